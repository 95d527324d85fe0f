// inference.cu — generates text from a checkpoint, streaming each token as it is sampled.
#include "tricycle.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static const char* help_text =
    "usage: inference CHECKPOINT [--prompt TEXT | --prompt-file FILE] [flags]\n"
    "\n"
    "Generates text from a checkpoint written by train_gpt (it carries its tokenizer) and\n"
    "streams it to stdout as it is produced. Each new token reuses the keys and values of the\n"
    "earlier ones (a KV cache), so it costs one position of work. An empty prompt starts from\n"
    "the end-of-text token; a prompt longer than the context window keeps its last tokens\n"
    "(with a notice on stderr).\n"
    "\n"
    "  --prompt TEXT        text to continue\n"
    "  --prompt-file FILE   read the prompt from a file\n"
    "  --tokens N           tokens to generate (default 256)\n"
    "  --temperature T      0 is greedy (default 0.8)\n"
    "  --seed S             sampling seed (default 42)\n"
    "  --top-k K            sample from the K most likely tokens only (default 0: all)\n"
    "  --top-p P            ... from the smallest set with probability P (default 1)\n"
    "  --no-cache           recompute the whole window for every token (slow; for comparison)\n"
    "  --tokens-out FILE    also write the generated token ids, one per line\n"
    "  --logits-out FILE    also write the prompt's logits: int32 T, int32 V, T int32 token ids,\n"
    "                       then (T, V) float32 logits, one row per prompt position\n";

struct Options {
    std::string checkpoint, prompt, tokens_out, logits_out;
    bool use_cache = true;
    int count = 256;
    Sampler sampler;
};

static Options parse_options(int argc, char** argv) {
    Options o;
    o.sampler.temperature = 0.8f, o.sampler.rng_state = 42;
    bool have_prompt = false;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        auto value = [&] { return flag_value(argc, argv, &i); };
        if (flag == "--prompt" || flag == "--prompt-file") {
            if (have_prompt) fail("give one --prompt or --prompt-file, not two");
            o.prompt = flag == "--prompt" ? std::string(value())
                                          : read_whole_file(value(), "prompt file", 1 << 26);
            have_prompt = true;
        } else if (flag == "--tokens") o.count = int(parse_int("--tokens", value(), 0, 1 << 24));
        else if (flag == "--temperature")
            o.sampler.temperature = float(parse_number("--temperature", value(), 0, 100));
        else if (flag == "--top-k")
            o.sampler.top_k = int(parse_int("--top-k", value(), 0, 1 << 30));
        else if (flag == "--top-p")
            o.sampler.top_p = float(parse_number("--top-p", value(), 1e-6, 1));
        else if (flag == "--seed")
            o.sampler.rng_state = uint64_t(parse_int("--seed", value(), 0, 1L << 62));
        else if (flag == "--no-cache") o.use_cache = false;
        else if (flag == "--tokens-out") o.tokens_out = value();
        else if (flag == "--logits-out") o.logits_out = value();
        else if (flag[0] != '-' && o.checkpoint.empty()) o.checkpoint = flag;
        else unknown_flag(argv[i]);
    }
    if (o.checkpoint.empty())
        fail("no checkpoint given (usage: inference CHECKPOINT [flags], see --help)");
    return o;
}

// The model and the tokenizer it carries, checked against each other.
static void load(const std::string& path, GPT* model, Tokenizer* tokenizer) {
    std::vector<FileSection> sections;
    gpt_load(model, path.c_str(), &sections);
    bool have_tokenizer = false;
    for (const FileSection& s : sections)
        if (!memcmp(s.tag, "TOKN", 4))
            tokenizer_parse(tokenizer, s.bytes, path.c_str()), have_tokenizer = true;
    if (!have_tokenizer)
        fail("checkpoint '%s': has no tokenizer (train_gpt writes one into every checkpoint)",
             path.c_str());
    if (tokenizer->vocab_size != model->config.vocab_size)
        fail("checkpoint '%s': its tokenizer has %d tokens but the model %d", path.c_str(),
             tokenizer->vocab_size, model->config.vocab_size);
}

// The key/value cache holds the prompt and the new tokens, up to the context: it must fit.
static void check_memory(const GPTConfig& c, const Options& o, size_t prompt_tokens) {
    size_t free_bytes, total_bytes;
    cuda_check(cudaMemGetInfo(&free_bytes, &total_bytes));
    double positions = std::min<double>(c.context, double(prompt_tokens) + o.count);
    double cache_bytes = 2.0 * c.layers * c.dim * sizeof(floatX) * positions;
    if (cache_bytes > 0.9 * double(free_bytes))
        fail(
            "checkpoint '%s': its key/value cache would need %.1f GB (%d layers, dim %d, %.0f "
            "positions); "
            "%.1f GB are available: lower --tokens",
            o.checkpoint.c_str(), cache_bytes / 1e9, c.layers, c.dim, positions, free_bytes / 1e9);
}

// One forward pass over the prompt (1, T): its logits at every position, for comparing with other
// implementations.
static void write_prompt_logits(GPT& model, const std::vector<int>& tokens, const char* path) {
    NoGrad no_grad;
    MemoryMark mark = memory_mark();
    int T = int(tokens.size()), V = model.config.vocab_size;
    int* device_tokens = device_alloc<int>(T);
    cuda_check(cudaMemcpy(device_tokens, tokens.data(), T * sizeof(int), cudaMemcpyHostToDevice));
    int padded_V = padded_vocab(V);  // the model's rows; the file keeps the real vocabulary
    std::vector<real> logits =
        download(gpt_forward_tape(model, device_tokens, 1, T, false, 0).data, long(T) * padded_V);
    std::vector<float> values;
    for (int t = 0; t < T; t++)
        values.insert(values.end(), logits.begin() + long(t) * padded_V,
                      logits.begin() + long(t) * padded_V + V);
    std::string out;
    int32_t sizes[2] = {T, V};
    out.append((const char*)sizes, sizeof sizes);
    out.append((const char*)tokens.data(), T * sizeof(int32_t));
    out.append((const char*)values.data(), values.size() * sizeof(float));
    write_file_atomic(path, out.data(), out.size(), "logits file");
    memory_release(mark);
}

static int run(int argc, char** argv) {
    Options o = parse_options(argc, argv);
    GPT model;
    Tokenizer tokenizer;
    load(o.checkpoint, &model, &tokenizer);
    std::vector<int32_t> encoded;
    tokenizer_encode(&tokenizer, o.prompt.data(), o.prompt.size(), &encoded);
    std::vector<int> tokens(encoded.begin(), encoded.end());
    if (tokens.empty()) tokens.push_back(tokenizer.eot_token);
    int context = model.config.context;
    if (int(tokens.size()) > context) {
        fprintf(stderr,
                "inference: note: the prompt has %zu tokens; keeping the last %d (the context "
                "window)\n",
                tokens.size(), context);
        tokens.erase(tokens.begin(), tokens.end() - context);
    }
    check_memory(model.config, o, tokens.size());
    if (!o.logits_out.empty()) write_prompt_logits(model, tokens, o.logits_out.c_str());

    FILE* ids = o.tokens_out.empty() ? nullptr : fopen(o.tokens_out.c_str(), "w");
    if (!o.tokens_out.empty() && !ids)
        fail("cannot write '%s': %s", o.tokens_out.c_str(), strerror(errno));
    fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
    double start = seconds_now();
    generate(model, tokens, o.count, o.sampler, o.use_cache, [&](int token) {
        std::string_view bytes = tokenizer_token_bytes(&tokenizer, token);
        fwrite(bytes.data(), 1, bytes.size(), stdout);
        fflush(stdout);
        if (ids) fprintf(ids, "%d\n", token);
    });
    double seconds = seconds_now() - start;
    printf("\n");
    fprintf(stderr, "inference: %d tokens in %.2f s (%.1f tokens/s)%s\n", o.count, seconds,
            o.count / std::max(seconds, 1e-9), o.use_cache ? "" : " without the cache");
    if (ids && (ferror(ids) | fclose(ids)))  // a full disk shows at the latest here
        fail("cannot write '%s': %s", o.tokens_out.c_str(), strerror(errno));
    return 0;
}

int main(int argc, char** argv) { return run_program("inference", help_text, argc, argv, run); }
