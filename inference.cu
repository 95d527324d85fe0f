// inference.cu — generates text from a checkpoint, streaming each token as it is sampled.
#include "tricycle.h"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static const char* help_text =
    "usage: inference CHECKPOINT [--prompt TEXT | --prompt-file FILE] [flags]\n"
    "\n"
    "Generates text from a checkpoint written by train_gpt (it carries its tokenizer) and streams "
    "it to\n"
    "stdout as it is produced. Each new token reuses the keys and values of the earlier ones (a "
    "KV\n"
    "cache), so it costs one position of work. An empty prompt starts from the end-of-text token; "
    "a\n"
    "prompt longer than the context window keeps its last tokens (with a notice on stderr).\n"
    "\n"
    "  --prompt TEXT        text to continue             --prompt-file FILE  read the prompt from "
    "a file\n"
    "  --tokens N           tokens to generate (default 256)\n"
    "  --temperature T      0 is greedy (default 0.8)    --seed S            sampling seed "
    "(default 42)\n"
    "  --top-k K            sample from the K most likely tokens only (default 0: all)\n"
    "  --top-p P            ... from the smallest set with probability P (default 1)\n"
    "  --no-cache           recompute the whole window for every token (slow; for comparison)\n"
    "  --tokens-out FILE    also write the generated token ids, one per line\n";

static int run(int argc, char** argv) {
    std::string checkpoint, prompt, tokens_out;
    bool have_prompt = false, use_cache = true;
    int count = 256;
    Sampler sampler;
    sampler.temperature = 0.8f, sampler.rng_state = 42;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        if (flag == "--prompt") prompt = flag_value(argc, argv, &i), have_prompt = true;
        else if (flag == "--prompt-file") {
            if (have_prompt) fail("give either --prompt or --prompt-file, not both");
            prompt = read_whole_file(flag_value(argc, argv, &i), "prompt file"), have_prompt = true;
        } else if (flag == "--tokens")
            count = int(parse_int("--tokens", flag_value(argc, argv, &i), 0, 1 << 24));
        else if (flag == "--temperature")
            sampler.temperature =
                float(parse_number("--temperature", flag_value(argc, argv, &i), 0, 100));
        else if (flag == "--top-k")
            sampler.top_k = int(parse_int("--top-k", flag_value(argc, argv, &i), 0, 1 << 30));
        else if (flag == "--top-p")
            sampler.top_p = float(parse_number("--top-p", flag_value(argc, argv, &i), 1e-6, 1));
        else if (flag == "--seed")
            sampler.rng_state =
                uint64_t(parse_int("--seed", flag_value(argc, argv, &i), 0, 1L << 62));
        else if (flag == "--no-cache") use_cache = false;
        else if (flag == "--tokens-out") tokens_out = flag_value(argc, argv, &i);
        else if (flag[0] != '-' && checkpoint.empty()) checkpoint = flag;
        else unknown_flag(argv[i]);
    }
    if (checkpoint.empty())
        fail("no checkpoint given (usage: inference CHECKPOINT [flags], see --help)");

    GPT model;
    std::vector<FileSection> sections;
    gpt_load(&model, checkpoint.c_str(), &sections);
    Tokenizer tokenizer;
    bool have_tokenizer = false;
    for (const FileSection& s : sections)
        if (!memcmp(s.tag, "TOKN", 4))
            tokenizer_parse(&tokenizer, s.bytes, checkpoint.c_str()), have_tokenizer = true;
    if (!have_tokenizer)
        fail("checkpoint '%s': has no tokenizer (train_gpt writes one into every checkpoint)",
             checkpoint.c_str());
    if (tokenizer.vocab_size != model.config.vocab_size)
        fail("checkpoint '%s': its tokenizer has %d tokens but the model %d", checkpoint.c_str(),
             tokenizer.vocab_size, model.config.vocab_size);

    std::vector<int32_t> encoded;
    tokenizer_encode(&tokenizer, prompt.data(), prompt.size(), &encoded);
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

    FILE* ids = tokens_out.empty() ? nullptr : fopen(tokens_out.c_str(), "w");
    if (!tokens_out.empty() && !ids) fail("cannot write '%s'", tokens_out.c_str());
    fwrite(prompt.data(), 1, prompt.size(), stdout);
    double start = seconds_now();
    generate(model, tokens, count, sampler, use_cache, [&](int token) {
        std::string_view bytes = tokenizer_token_bytes(&tokenizer, token);
        fwrite(bytes.data(), 1, bytes.size(), stdout);
        fflush(stdout);
        if (ids) fprintf(ids, "%d\n", token);
    });
    double seconds = seconds_now() - start;
    printf("\n");
    fprintf(stderr, "inference: %d tokens in %.2f s (%.1f tokens/s)%s\n", count, seconds,
            count / std::max(seconds, 1e-9), use_cache ? "" : " without the cache");
    if (ids) fclose(ids);
    return 0;
}

int main(int argc, char** argv) { return run_program("inference", help_text, argc, argv, run); }
