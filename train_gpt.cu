// train_gpt.cu — trains a GPT on token files: gradient accumulation, AdamW with warmup and cosine
// decay, clipping, evaluation, samples, metrics (CSV and an SVG loss curve) and checkpoints that
// survive a crash and resume exactly; on one process or, started by mpirun, on several (data
// parallel, with ZeRO-1 optimizer shards).
#include "distributed.h"
#include "tricycle.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

static const char* help_text =
    "usage: train_gpt --train FILE.bin --val FILE.bin --tokenizer FILE.tok [flags]\n"
    "\n"
    "Trains a GPT on token files made by `tokenizer encode`. Writes OUT/latest.bin (every\n"
    "evaluation and at the end), OUT/best.bin (lowest validation loss), OUT/metrics.csv and\n"
    "OUT/loss.svg. Checkpoints hold the config, tokenizer, parameters, optimizer state, step and\n"
    "random state; --resume continues from OUT/latest.bin (run the same command again with\n"
    "--resume). One run at a time may use an output folder (it is locked).\n"
    "\n"
    "Started by mpirun (mpirun -np R train_gpt ...), R processes train one model: each runs\n"
    "grad-accum / R of every step's micro-batches; rank 0 alone prints and writes OUT.\n"
    "\n"
    "data and output:\n"
    "  --train FILE          training tokens               --val FILE        validation tokens\n"
    "  --tokenizer FILE.tok  the tokenizer of those files  --out DIR         output (default out)\n"
    "  --resume              continue from OUT/latest.bin (model flags, if given, must match it)\n"
    "  --init FILE.bin       start from this model file's parameters (e.g. one made by\n"
    "                        tools/import_hf.py) with a fresh optimizer; its config is used\n"
    "                        (--dropout, --attention-dropout may change it; other model flags\n"
    "                        must match it), and --tokenizer must be the one it carries\n"
    "model (a preset, then overrides):\n"
    "  --preset NAME         debug | mini | shakespeare | smol (default shakespeare)\n"
    "  --layers N  --heads N  --dim N  --context N       sizes\n"
    "  --vocab-size N        must equal the tokenizer's vocabulary (default: taken from it)\n"
    "  --dropout P           on embeddings and residual branches (--attention-dropout P: on\n"
    "                        attention probabilities)\n"
    "  --norm layernorm|rmsnorm   --activation gelu|swiglu   --rotary   --untied\n"
    "  --attention plain|flash     attention kernels (same results; by default flash where it\n"
    "                        runs on tensor cores: the bfloat16 GPU build, heads of 64 or 128,\n"
    "                        no attention dropout; plain elsewhere)\n"
    "  --tf32 1|0            GPU float build: float products on TF32 tensor cores (default 1)\n"
    "training:\n"
    "  --batch N  --grad-accum N  --steps N             sequences per micro-batch, micro-batches\n"
    "                                                   per step, optimizer steps\n"
    "  --lr X  --min-lr X  --warmup N                   linear warmup, then cosine decay\n"
    "                                                   to min-lr\n"
    "  --weight-decay X  --beta1 X  --beta2 X  --clip X AdamW; clip the global gradient\n"
    "                                                   norm (0: off)\n"
    "  --seed N                                         initialisation, batches and dropout\n"
    "  --eval-interval N  --eval-steps N                validation every N steps, over N batches\n"
    "  --sample-every N  --sample-tokens N              print a sample every N steps (0: never)\n"
    "  --log-every N                                    a log line every N steps when not on a\n"
    "                                                   terminal\n"
    "  --threads N                                      CPU build: cores to use (default: all)\n"
    "  --zero 1|0                                       with several ranks: 1 shards AdamW's\n"
    "                                                   state over them (ZeRO-1, default), 0\n"
    "                                                   keeps all of it on every rank\n"
    "  --profile                                        time every kernel and matrix product\n";

// ----------------------------------------------------------------------------------------------------
// Options

struct Options {
    std::string preset = "shakespeare", train, val, tokenizer, out = "out", init;
    bool resume = false;
    GPTConfig model;
    std::set<std::string> model_flags;  // the model flags given (--resume checks them)
    int vocab_size = 0;                 // 0: the tokenizer's
    int batch = 64, grad_accum = 1;
    long steps = 5000, warmup = 100;
    float lr = 1e-3f, min_lr = 1e-4f, weight_decay = 0.1f, beta1 = 0.9f, beta2 = 0.99f, clip = 1.0f;
    uint64_t seed = 1337;
    int eval_interval = 250, eval_steps = 20, sample_every = 0, sample_tokens = 200;
    int log_every = 10, threads = 0;
    bool profile = false;
    bool zero = true;  // ZeRO-1: each rank keeps the optimizer state of its shard only
};

// Each preset brings a model and training defaults that suit it.
static Options preset_options(const std::string& preset) {
    Options o;
    o.preset = preset;
    o.model = gpt_preset(preset);
    if (preset == "debug") {
        o.batch = 8, o.steps = 200, o.warmup = 20, o.eval_interval = 50, o.eval_steps = 5;
    } else if (preset == "mini") {  // minutes on two CPU cores
        o.batch = 16, o.steps = 1500, o.warmup = 100, o.eval_interval = 250, o.eval_steps = 10;
    } else if (preset == "smol") {  // the seed's smol GPT: 4 x 128 micro-batches of 1024 tokens
        o.batch = 4, o.grad_accum = 128, o.steps = 10000, o.warmup = 150, o.lr = 6e-4f;
        o.min_lr = 6e-5f, o.beta2 = 0.95f;
    }
    return o;
}

static void choice(const std::string& flag, const std::string& value, const char* a,
                   const char* b) {
    if (value != a && value != b)
        fail("flag %s expects %s or %s, got '%s'", flag.c_str(), a, b, value.c_str());
}

// The model's flags (recorded, so that --resume can compare them with the checkpoint's config).
static bool parse_model_flag(const std::string& flag, const std::function<const char*()>& value,
                             Options& o) {
    GPTConfig& m = o.model;
    auto integer = [&](long max) { return int(parse_int(flag.c_str(), value(), 1, max)); };
    auto number = [&] { return float(parse_number(flag.c_str(), value(), 0, 0.99)); };
    if (flag == "--layers") m.layers = integer(1024);
    else if (flag == "--heads") m.heads = integer(1 << 16);
    else if (flag == "--dim") m.dim = integer(1 << 16);
    else if (flag == "--context") m.context = integer(1 << 17);
    else if (flag == "--vocab-size") o.vocab_size = integer(1 << 24);
    else if (flag == "--dropout") m.dropout = number();
    else if (flag == "--attention-dropout") m.attention_dropout = number();
    else if (flag == "--rotary") m.rotary = true;
    else if (flag == "--untied") m.tied_embeddings = false;
    else if (flag == "--norm") {
        std::string v = value();
        choice(flag, v, "layernorm", "rmsnorm");
        m.norm = v == "rmsnorm" ? Norm::rmsnorm : Norm::layernorm;
    } else if (flag == "--activation") {
        std::string v = value();
        choice(flag, v, "gelu", "swiglu");
        m.activation = v == "swiglu" ? Activation::swiglu : Activation::gelu;
    } else return false;
    o.model_flags.insert(flag);
    return true;
}

static bool parse_training_flag(const std::string& flag, const std::function<const char*()>& value,
                                Options& o) {
    auto integer = [&](long min, long max) { return parse_int(flag.c_str(), value(), min, max); };
    auto number = [&](double min, double max) {
        return float(parse_number(flag.c_str(), value(), min, max));
    };
    if (flag == "--batch") o.batch = int(integer(1, 1 << 20));
    else if (flag == "--grad-accum") o.grad_accum = int(integer(1, 1 << 20));
    else if (flag == "--steps") o.steps = integer(1, 1L << 40);
    else if (flag == "--lr") o.lr = number(0, 1e6);
    else if (flag == "--min-lr") o.min_lr = number(0, 10);
    else if (flag == "--warmup") o.warmup = integer(0, 1L << 40);
    else if (flag == "--weight-decay") o.weight_decay = number(0, 10);
    else if (flag == "--beta1") o.beta1 = number(0, 0.999999);
    else if (flag == "--beta2") o.beta2 = number(0, 0.999999);
    else if (flag == "--clip") o.clip = number(0, 1e9);
    else if (flag == "--seed") o.seed = uint64_t(integer(0, 1L << 62));
    else if (flag == "--eval-interval") o.eval_interval = int(integer(0, 1 << 30));
    else if (flag == "--eval-steps") o.eval_steps = int(integer(1, 1 << 30));
    else if (flag == "--sample-every") o.sample_every = int(integer(0, 1 << 30));
    else if (flag == "--sample-tokens") o.sample_tokens = int(integer(0, 1 << 20));
    else if (flag == "--log-every") o.log_every = int(integer(1, 1 << 30));
    else if (flag == "--threads") o.threads = int(integer(1, 1024));
    else if (flag == "--zero") o.zero = integer(0, 1) == 1;
    else return false;
    return true;
}

static Options parse_options(int argc, char** argv) {
    std::string preset = "shakespeare";
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--preset")) preset = argv[i + 1];
    Options o = preset_options(preset);
    use_tf32 = true;  // training is the tensor cores' case; the tests keep exact float products
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        std::function<const char*()> value = [&] { return flag_value(argc, argv, &i); };
        if (flag == "--preset") value();
        else if (flag == "--train") o.train = value();
        else if (flag == "--val") o.val = value();
        else if (flag == "--tokenizer") o.tokenizer = value();
        else if (flag == "--out") o.out = value();
        else if (flag == "--resume") o.resume = true;
        else if (flag == "--init") o.init = value();
        else if (flag == "--profile") o.profile = true;
        else if (flag == "--attention") {
            std::string v = value();
            choice(flag, v, "plain", "flash");
            attention_kernels = v == "flash" ? AttentionKernels::flash : AttentionKernels::plain;
        } else if (flag == "--tf32") use_tf32 = parse_int("--tf32", value(), 0, 1);
        else if (!parse_model_flag(flag, value, o) && !parse_training_flag(flag, value, o))
            unknown_flag(argv[i]);
    }
    if (o.train.empty() || o.val.empty())
        fail("--train and --val are required (token files from `tokenizer encode`)");
    if (o.tokenizer.empty() && !o.resume)
        fail("--tokenizer is required (the .tok file the token files were made with)");
    if (o.min_lr > o.lr) fail("--min-lr %g is above --lr %g", o.min_lr, o.lr);
    if (o.resume && !o.init.empty())
        fail("--init '%s' with --resume: a resumed run continues from OUT/latest.bin's parameters",
             o.init.c_str());
    return o;
}

// ----------------------------------------------------------------------------------------------------
// Checkpoints: the model file with sections for the tokenizer, AdamW's moments and the training
// state. With several ranks every rank takes part in saving (under ZeRO-1 the moments and master
// weights are gathered from their shards) and rank 0 alone writes; every rank loads the file and
// keeps its own shard, so a run saved by R ranks resumes on any number of them.

struct TrainingState {
    int64_t step = 0;            // steps completed
    int64_t optimizer_step = 0;  // AdamW's bias-correction counter
    uint64_t micro_batches = 0;  // training micro-batches drawn so far (see window_stream)
    double best_val_loss = INFINITY;
    double elapsed_seconds = 0;  // training time before this run
};

static FileSection section(const char* tag, std::string bytes) {
    FileSection s;
    memcpy(s.tag, tag, 4);
    s.bytes = std::move(bytes);
    return s;
}

// The optimizer's part of an n-value parameter buffer on this rank: all of it, or its ZeRO-1 shard.
static Shard optimizer_shard(const Options& o, const Job& job, long n) {
    return o.zero ? shard_of(n, job.rank, job.ranks) : Shard{0, n};
}

// A whole buffer in parameter order as a section's bytes, on rank 0 (the other ranks get nothing):
// its own copy when this rank holds all of it, else gathered from the ranks' shards.
static std::string whole_section(const GPT& model, const real* device, long held, const Job& job) {
    long n = model.params.size;
    if (held == n)
        return job.rank == 0 ? parameters_section(model.config, download(device, n))
                             : std::string();
    std::vector<float> values = gather_shards(device, n);
    return job.rank == 0
               ? parameters_section(model.config, std::vector<real>(values.begin(), values.end()))
               : std::string();
}

static void save_checkpoint(const std::string& path, GPT& model, const Tokenizer& tokenizer,
                            const AdamW& adam, const TrainingState& state, const Job& job) {
    const Parameters& p = model.params;
    std::vector<FileSection> sections = {
        section("TOKN", tokenizer_serialize(&tokenizer)),
        section("ADMM", whole_section(model, adam.m, adam.n, job)),
        section("ADMV", whole_section(model, adam.v, adam.n, job)),
        section("TRAN", std::string((const char*)&state, sizeof state))};
    if (p.master)  // mixed precision: the float values the optimizer updates
        sections.push_back(section("MAST", whole_section(model, p.master, p.master_count, job)));
    if (job.rank == 0) gpt_save(model, path.c_str(), sections);
}

static void check_training_state(const TrainingState& s, const std::vector<real>& second_moments,
                                 const char* path) {
    bool sane = s.step >= 0 && s.step <= (1L << 40) && s.optimizer_step >= 0 &&
                s.optimizer_step <= (1L << 40) && !std::isnan(s.best_val_loss) &&
                s.best_val_loss >= 0 && std::isfinite(s.elapsed_seconds) && s.elapsed_seconds >= 0;
    if (!sane)
        fail(
            "checkpoint '%s': its training state (step %lld, optimizer step %lld, best loss %g, "
            "time %g s) is out of range",
            path, (long long)s.step, (long long)s.optimizer_step, s.best_val_loss,
            s.elapsed_seconds);
    for (size_t i = 0; i < second_moments.size(); i++)
        if (second_moments[i] < 0)
            fail("checkpoint '%s': AdamW's second moment %zu is negative (%g)", path, i,
                 double(second_moments[i]));
}

static void upload_slice(real* device, const std::vector<real>& values, Shard shard) {
    upload(device, values.data() + shard.offset, shard.count);
}

// The model, tokenizer, training state, and this rank's part of the optimizer (and, in the bfloat16
// build, of the master weights).
static void load_checkpoint(const std::string& path, GPT* model, Tokenizer* tokenizer, AdamW* adam,
                            TrainingState* state, const Options& o, const Job& job) {
    std::vector<FileSection> sections;
    gpt_load(model, path.c_str(), &sections);
    long n = model->params.size;
    Shard shard = optimizer_shard(o, job, n);
    adamw_create(adam, shard.count, shard.offset);
    std::vector<real> first_moments, second_moments;
    int found = 0;
    bool have_master = false;
    auto values = [&](const FileSection& s) {
        return parameters_from_section(model->config, s, path.c_str());
    };
    for (const FileSection& s : sections) {
        std::string tag(s.tag, 4);
        if (tag == "TOKN") tokenizer_parse(tokenizer, s.bytes, path.c_str()), found |= 1;
        else if (tag == "ADMM") first_moments = values(s), found |= 2;
        else if (tag == "ADMV") second_moments = values(s), found |= 4;
        else if (tag == "TRAN") {
            if (s.bytes.size() != sizeof *state)
                fail("checkpoint '%s': section 'TRAN' holds %zu bytes, expected %zu", path.c_str(),
                     s.bytes.size(), sizeof *state);
            memcpy(state, s.bytes.data(), sizeof *state), found |= 8;
        } else if (tag == "MAST" && model->params.master) {
            upload(model->params.master, values(s).data(), n);
            have_master = true;
        }
    }
    if (found != 15)
        fail(
            "checkpoint '%s': lacks the tokenizer, optimizer or training state (a weights-only "
            "file cannot be resumed)",
            path.c_str());
    // The float build's checkpoints have no MAST: their parameters are the master weights. A
    // parameter block of bfloat16 values without one is a bfloat16 build's file that lost it.
    if (model->params.master && !have_master) {
        bool all_bfloat16 = true;
        for (real v : download(model->params.master, n)) {
            float value = float(v);
            uint32_t bits;
            memcpy(&bits, &value, sizeof bits);
            all_bfloat16 &= (bits & 0xffff) == 0;
        }
        if (all_bfloat16)
            fail(
                "checkpoint '%s': lacks the 'MAST' section (the float32 master weights) that the "
                "bfloat16 build writes beside its bfloat16 parameters",
                path.c_str());
    }
    if (tokenizer->vocab_size != model->config.vocab_size)
        fail("checkpoint '%s': its tokenizer has %d tokens, its model %d", path.c_str(),
             tokenizer->vocab_size, model->config.vocab_size);
    check_training_state(*state, second_moments, path.c_str());
    upload_slice(adam->m, first_moments, shard);
    upload_slice(adam->v, second_moments, shard);
    parameters_shard_master(model->params, shard.offset, shard.count);
    adam->step = state->optimizer_step;
}

// --resume and --init: model flags given on the command line must say what the file holds
// (`changeable`: --init lets the dropout flags change the file's config).
static void check_model_flags(const Options& o, const GPTConfig& c, const std::string& path,
                              const char* mode, bool changeable) {
    const GPTConfig& m = o.model;
    std::vector<std::pair<const char*, bool>> same = {
        {"--layers", m.layers == c.layers},
        {"--heads", m.heads == c.heads},
        {"--dim", m.dim == c.dim},
        {"--context", m.context == c.context},
        {"--vocab-size", o.vocab_size == c.vocab_size},
        {"--dropout", changeable || m.dropout == c.dropout},
        {"--attention-dropout", changeable || m.attention_dropout == c.attention_dropout},
        {"--rotary", m.rotary == c.rotary},
        {"--untied", m.tied_embeddings == c.tied_embeddings},
        {"--norm", m.norm == c.norm},
        {"--activation", m.activation == c.activation}};
    std::string differ;
    for (const auto& [flag, equal] : same)
        if (o.model_flags.count(flag) && !equal)
            differ += (differ.empty() ? "" : ", ") + std::string(flag);
    if (!differ.empty())
        fail("%s: %s differ from the model file '%s' (leave them out to use its model)", mode,
             differ.c_str(), path.c_str());
}

// --init: the model file's config and parameters, and its tokenizer (when it carries one) must be
// --tokenizer's; the optimizer starts fresh.
static void init_from_file(const Options& o, GPT* model, const Tokenizer& tokenizer) {
    std::vector<FileSection> sections;
    gpt_load(model, o.init.c_str(), &sections);
    check_model_flags(o, model->config, o.init, "--init", true);
    if (o.model_flags.count("--dropout")) model->config.dropout = o.model.dropout;
    if (o.model_flags.count("--attention-dropout"))
        model->config.attention_dropout = o.model.attention_dropout;
    if (model->config.vocab_size != tokenizer.vocab_size)
        fail("--init: the model file '%s' has vocab size %d but --tokenizer '%s' has %d tokens",
             o.init.c_str(), model->config.vocab_size, o.tokenizer.c_str(), tokenizer.vocab_size);
    for (const FileSection& s : sections) {
        if (memcmp(s.tag, "TOKN", 4)) continue;
        Tokenizer carried;
        tokenizer_parse(&carried, s.bytes, o.init.c_str());
        if (tokenizer_fingerprint(&carried) != tokenizer_fingerprint(&tokenizer))
            fail("--init: --tokenizer '%s' is not the tokenizer the model file '%s' carries",
                 o.tokenizer.c_str(), o.init.c_str());
    }
}

// Token files record the fingerprint of the tokenizer that made them (dataloader_open refuses
// another one's); 0 means not recorded (files from other tools), accepted with a note.
static void note_unrecorded_tokenizers(const DataLoader& train, const DataLoader& val) {
    for (const DataLoader* loader : {&train, &val})
        if (loader->file.tokenizer_fingerprint == 0)
            fprintf(stderr, "train_gpt: note: token file '%s' does not record its tokenizer\n",
                    loader->file.path.c_str());
}

struct MetricRow {
    long step;
    // NAN where not measured
    double train_loss, val_loss, lr, grad_norm, tokens_per_second, seconds;
};

static const char* metrics_header = "step,train_loss,val_loss,lr,grad_norm,tokens_per_s,time_s";

static std::string csv_number(double v, const char* format) {
    if (std::isnan(v)) return "";
    char text[32];
    snprintf(text, sizeof text, format, v);
    return text;
}

static std::string metrics_line(const MetricRow& r) {
    return std::to_string(r.step) + "," + csv_number(r.train_loss, "%.6f") + "," +
           csv_number(r.val_loss, "%.6f") + "," + csv_number(r.lr, "%.6g") + "," +
           csv_number(r.grad_norm, "%.6g") + "," + csv_number(r.tokens_per_second, "%.1f") + "," +
           csv_number(r.seconds, "%.3f") + "\n";
}

// A number as write_metrics prints it: plain decimal, without spaces, hex, "inf" or "nan".
static bool parse_metric_field(const std::string& field, double* value) {
    if (field.empty()) return *value = NAN, true;  // an empty field is a value not measured
    if (field.find_first_not_of("0123456789+-.eE") != std::string::npos) return false;
    char* end;
    *value = strtod(field.c_str(), &end);
    return *end == 0 && std::isfinite(*value);
}

// On resume, keep the rows up to the checkpoint's step (a crash may have left later ones). The file
// is this program's own: a line that is not one of its rows is an error, not a row to guess at.
static std::vector<MetricRow> read_metrics(const std::string& path, long last_step) {
    std::vector<MetricRow> rows;
    struct stat info;
    if (stat(path.c_str(), &info) != 0 && errno == ENOENT) return rows;  // none yet
    std::stringstream in(read_whole_file(path.c_str(), "metrics file", size_t(1) << 30));
    std::string line;
    long previous_step = -1;
    std::getline(in, line);
    if (line != metrics_header)
        fail("metrics file '%s': line 1 is not the header '%s'", path.c_str(), metrics_header);
    for (long number = 2; std::getline(in, line); number++) {
        std::vector<double> fields;
        std::stringstream ss(line);
        std::string field;
        bool numbers = true;
        double v = NAN;
        while (std::getline(ss, field, ','))
            numbers &= parse_metric_field(field, &v), fields.push_back(v);
        while (fields.size() < 7) fields.push_back(NAN);  // getline drops trailing empty fields
        double step = fields[0];
        if (!numbers || fields.size() > 7 || !(step >= 0 && step <= 1e15 && step == floor(step)))
            fail(
                "metrics file '%s': line %ld is not a row of %s (a step, then finite numbers or "
                "empty fields)",
                path.c_str(), number, metrics_header);
        if (long(step) <= previous_step)
            fail("metrics file '%s': line %ld: step %ld after step %ld, expected increasing steps",
                 path.c_str(), number, long(step), previous_step);
        previous_step = long(step);
        MetricRow r{long(step), fields[1], fields[2], fields[3], fields[4], fields[5], fields[6]};
        if (r.step <= last_step) rows.push_back(r);
    }
    return rows;
}

static void write_metrics(const std::string& path, const std::vector<MetricRow>& rows) {
    std::string text = std::string(metrics_header) + "\n";
    for (const MetricRow& r : rows) text += metrics_line(r);
    write_file_atomic(path.c_str(), text.data(), text.size(), "metrics file");
}

// Train loss (every step, smoothed) and validation loss against step, on a 640x400 canvas.
static void write_loss_svg(const std::string& path, const std::vector<MetricRow>& rows) {
    const double width = 640, height = 400, left = 60, right = 20, top = 30, bottom = 45;
    double max_step = 1, low = INFINITY, high = -INFINITY;
    for (const MetricRow& r : rows) {
        max_step = std::max(max_step, double(r.step));
        for (double v : {r.train_loss, r.val_loss})
            if (std::isfinite(v)) low = std::min(low, v), high = std::max(high, v);
    }
    if (!std::isfinite(low)) low = 0, high = 1;
    if (high - low < 1e-6) high = low + 1;
    auto x = [&](double step) { return left + step / max_step * (width - left - right); };
    auto y = [&](double loss) {
        return top + (high - loss) / (high - low) * (height - top - bottom);
    };
    std::string svg;
    char buffer[256];
    auto add = [&](const char* format, auto... args) {
        snprintf(buffer, sizeof buffer, format, args...);
        svg += buffer;
    };
    add("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" "
        "font-family=\"sans-serif\" font-size=\"12\">\n",
        width, height);
    add("<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    for (int i = 0; i <= 4; i++) {  // horizontal grid with loss labels, and step labels below
        double loss = low + (high - low) * i / 4, step = max_step * i / 4;
        add("<line x1=\"%g\" y1=\"%.1f\" x2=\"%g\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, y(loss),
            width - right, y(loss));
        add("<text x=\"%g\" y=\"%.1f\" text-anchor=\"end\">%.3f</text>\n", left - 6, y(loss) + 4,
            loss);
        add("<text x=\"%.1f\" y=\"%g\" text-anchor=\"middle\">%.0f</text>\n", x(step),
            height - bottom + 16, step);
    }
    add("<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">step</text>\n", (left + width - right) / 2,
        height - 8);
    add("<text x=\"%g\" y=\"18\">loss: train (blue, smoothed), validation (orange)</text>\n", left);
    std::string train_points, val_points;
    double smoothed = NAN;
    for (const MetricRow& r : rows) {
        if (std::isfinite(r.train_loss)) {
            smoothed = std::isnan(smoothed) ? r.train_loss : 0.9 * smoothed + 0.1 * r.train_loss;
            add("%.1f,%.1f ", x(r.step), y(smoothed));
            train_points += buffer;
        }
        if (std::isfinite(r.val_loss)) {
            add("%.1f,%.1f ", x(r.step), y(r.val_loss));
            val_points += buffer;
        }
    }
    svg += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"" +
           train_points + "\"/>\n";
    svg += "<polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"2\" points=\"" + val_points +
           "\"/>\n";
    svg += "</svg>\n";
    write_file_atomic(path.c_str(), svg.data(), svg.size(), "loss curve");
}

// ----------------------------------------------------------------------------------------------------
// Training

static std::string duration_text(double seconds) {
    char text[32];
    if (seconds < 60) snprintf(text, sizeof text, "%.0fs", seconds);
    else if (seconds < 3600)
        snprintf(text, sizeof text, "%dm%02ds", int(seconds) / 60, int(seconds) % 60);
    else snprintf(text, sizeof text, "%dh%02dm", int(seconds) / 3600, int(seconds) / 60 % 60);
    return text;
}

// A step's memory, from the config and batch alone, against what the device (or, on the CPU, the
// machine) has: a batch that cannot fit fails here, naming the flag, not in an allocator. Under
// ZeRO-1 a rank holds 1/ranks of the optimizer state (moments, and master weights in bfloat16). The
// bfloat16 build also sums gradients in float. On the CPU, the ranks on one machine share its
// memory.
static void check_memory(const GPTConfig& c, const Options& o, const Job& job) {
    double parameters = 0;  // as the model holds them: the vocabulary padded
    for (const GPTParameter& p : gpt_parameter_layout(c)) parameters += double(p.buffer_size);
    bool mixed = sizeof(floatX) < sizeof(real);
    double optimizer = 2 * sizeof(real) + (mixed ? sizeof(real) : 0);
    double per_parameter =
        2 * sizeof(floatX) + (mixed ? sizeof(real) : 0) + optimizer / (o.zero ? job.ranks : 1);
    double activations = gpt_activations_bytes(c, o.batch, c.context),
           needed = parameters * per_parameter + activations;
    size_t free_bytes = 0, total_bytes = 0;
    cuda_check(cudaMemGetInfo(&free_bytes, &total_bytes));
#ifndef __CUDACC__
    free_bytes /= size_t(job.local_ranks);
#endif
    if (needed > 0.9 * double(free_bytes))
        fail(
            "--batch %d with context %d needs about %.1f GB (activations %.1f GB, parameters and "
            "optimizer %.1f GB); %.1f GB are available: lower --batch (or --context)",
            o.batch, c.context, needed / 1e9, activations / 1e9, parameters * per_parameter / 1e9,
            free_bytes / 1e9);
}

// Everything one run holds.
struct Run {
    Options o;
    Job job;
    GPT model;
    Tokenizer tokenizer;
    AdamW adam;  // over the whole parameter buffer, or this rank's shard of it (ZeRO-1)
    real* grad_sum = nullptr;  // bfloat16 build: a step's gradients summed in float
    // A training micro-batch's inputs and targets on their way to the device: pinned, so that the
    // copy is queued like a kernel; reused once the event says the last copy is done.
    int* host_batch = nullptr;
    cudaEvent_t batch_copied = nullptr;
    TrainingState state;
    uint64_t micro_batches = 0;  // training micro-batches drawn so far, by all ranks together
    DataLoader train, val;
    GPTActivations acts;
    std::string latest, best, metrics_path, svg_path;
    std::vector<MetricRow> rows;  // written so far
    MetricRow row;                // the last step's, written after its evaluation
    FILE* metrics = nullptr;      // rank 0's
    bool on_terminal = false;
    double run_start = 0, elapsed_before = 0, step_seconds_total = 0;
    long first_step = 0, timed_steps = 0;
    ~Run() {
        if (metrics) fclose(metrics);
        (void)cudaFree(grad_sum);
        (void)cudaFreeHost(host_batch);
        if (batch_copied) (void)cudaEventDestroy(batch_copied);
    }
};

// Mean loss over the first eval_steps batches of the validation file (the same batches every time).
// Rank r evaluates batches r, r + ranks, ...; the sum comes together over the ranks.
static double evaluate(Run& r, int* device_batch) {
    DataLoader& val = r.val;
    double total = 0;
    for (int i = r.job.rank; i < r.o.eval_steps; i += r.job.ranks) {
        dataloader_seek_batch(&val, size_t(i));
        dataloader_next_batch(&val);
        int n = val.B * val.T;
        cuda_check(
            cudaMemcpy(device_batch, val.inputs.data(), n * sizeof(int), cudaMemcpyHostToDevice));
        cuda_check(cudaMemcpy(device_batch + n, val.targets.data(), n * sizeof(int),
                              cudaMemcpyHostToDevice));
        MemoryMark mark = memory_mark();
        gpt_forward(r.model, r.acts, device_batch, val.B, val.T, false, 0);
        total += gpt_loss(r.acts, device_batch + n, r.model.config.vocab_size);
        memory_release(mark);
    }
    return all_reduce_sum(total) / r.o.eval_steps;
}

// Training micro-batch g (counted from the start of training over all ranks) reads its windows from
// a random stream of its own: micro-batch g reads the same windows whatever the number of ranks,
// and a resumed run continues from the count. (Apart from dropout's seeds, random_bits(seed, g).)
static uint64_t window_stream(uint64_t seed, uint64_t micro_batch) {
    return random_bits(mix64(seed ^ 0x77696E646F777321ull), micro_batch);
}

// The inputs and targets of training micro-batch g, on the device.
static void load_micro_batch(Run& r, uint64_t g, int* device_batch) {
    DataLoader& loader = r.train;
    size_t n = size_t(loader.B) * loader.T;
    dataloader_set_rng_state(&loader, window_stream(r.o.seed, g));
    dataloader_next_batch(&loader);
    if (!r.host_batch) {
        cuda_check(cudaMallocHost(&r.host_batch, 2 * n * sizeof(int)));
        cuda_check(cudaEventCreateWithFlags(&r.batch_copied, cudaEventDisableTiming));
    } else {
        cuda_check(cudaEventSynchronize(r.batch_copied));
    }
    std::copy(loader.inputs.begin(), loader.inputs.end(), r.host_batch);
    std::copy(loader.targets.begin(), loader.targets.end(), r.host_batch + n);
    cuda_check(
        cudaMemcpyAsync(device_batch, r.host_batch, 2 * n * sizeof(int), cudaMemcpyHostToDevice));
    cuda_check(cudaEventRecord(r.batch_copied));
}

// One optimizer step of grad_accum micro-batches, each contributing 1/grad_accum of the loss. Rank
// r runs the step's micro-batches r * local ... (r + 1) * local - 1 (local = grad_accum / ranks;
// after each is queued, on_micro_batch(micro-batches done by all ranks)); the gradients are summed
// over the ranks; then the norm of the whole gradient, and AdamW with clipping over this rank's
// part of the buffer, whose new values go to every rank when that is a shard. The host queues all
// of it without waiting for the device: the micro-batches' losses add up on the device
// (step_values[0]), and AdamW leaves the parameters alone when the norm (step_values[1]) is not
// finite. The one wait is at the end, reading both. Returns the loss; the norm is left in
// grad_norm.
static double train_step(Run& r, int* device_batch, real* step_values, long step, real* grad_norm,
                         const std::function<void(int)>& on_micro_batch) {
    const Options& o = r.o;
    Parameters& params = r.model.params;
    int local = o.grad_accum / r.job.ranks;
    real* loss_sum = step_values;
    real* norm = step_values + 1;
    parameters_zero_grad(params);
    cuda_check(cudaMemset(loss_sum, 0, sizeof(real)));
    if (r.grad_sum) cuda_check(cudaMemset(r.grad_sum, 0, params.size * sizeof(real)));
    for (int micro = 0; micro < local; micro++) {
        uint64_t g = r.micro_batches + uint64_t(r.job.rank) * local + micro;
        load_micro_batch(r, g, device_batch);
        MemoryMark mark = memory_mark();
        gpt_forward(r.model, r.acts, device_batch, r.train.B, r.train.T, true,
                    random_bits(o.seed, g));
        gpt_backward(r.model, r.acts, device_batch + r.train.B * r.train.T,
                     real(1.0 / o.grad_accum));
        add_loss(loss_sum, r.acts.loss, real(1.0 / o.grad_accum));
        if (r.grad_sum) parameters_add_grad_to(params, r.grad_sum);
        memory_release(mark);
        on_micro_batch((micro + 1) * r.job.ranks);
    }
    r.micro_batches += uint64_t(o.grad_accum);
    // The float build sums in its gradient buffer (floatX is real there), the bfloat16 build in
    // grad_sum, rounded once into the gradients when every rank's part is in.
    all_reduce_sum(r.grad_sum ? r.grad_sum : reinterpret_cast<real*>(params.grad), params.size);
    if (r.grad_sum) parameters_grad_from(params, r.grad_sum);
    gradient_norm(norm, params.grad, params.size);
    float lr = learning_rate(step, o.warmup, o.steps, o.lr, o.min_lr);
    adamw_update(&r.adam, params, lr, norm, o.clip);
    if (r.adam.n < params.size) all_gather_shards(params.data, params.size);
    real values[2];
    cuda_check(cudaMemcpy(values, step_values, sizeof values, cudaMemcpyDeviceToHost));
    double loss_sum_host = all_reduce_sum(double(values[0]));
    *grad_norm = values[1];
    if (!std::isfinite(loss_sum_host) || !std::isfinite(*grad_norm))
        fail(
            "step %ld: the loss is %g and the gradient norm %g; stopping without a checkpoint of "
            "it (the last good one is in %s)",
            step + 1, loss_sum_host, double(*grad_norm), o.out.c_str());
    return loss_sum_host;
}

static void print_sample(GPT& model, Tokenizer& tokenizer, int tokens, uint64_t seed) {
    Sampler sampler;
    sampler.temperature = 0.8f, sampler.top_k = 40, sampler.rng_state = seed;
    std::vector<int> context = {tokenizer.eot_token};
    printf("---- sample ----\n");
    generate(model, context, tokens, sampler, true, [&](int token) {
        std::string_view bytes = tokenizer_token_bytes(&tokenizer, token);
        fwrite(bytes.data(), 1, bytes.size(), stdout);
    });
    printf("\n----------------\n");
    fflush(stdout);
}

// Rank 0's output folder, created and locked (a new run into one that holds a run is noted);
// every rank knows the checkpoints' paths.
static void open_output(Run& r) {
    const Options& o = r.o;
    r.latest = o.out + "/latest.bin", r.best = o.out + "/best.bin";
    r.metrics_path = o.out + "/metrics.csv", r.svg_path = o.out + "/loss.svg";
    if (r.job.rank != 0) return;
    for (size_t slash = 0; slash != std::string::npos;) {  // mkdir -p
        slash = o.out.find('/', slash + 1);
        std::string folder = o.out.substr(0, slash);
        if (mkdir(folder.c_str(), 0755) != 0 && errno != EEXIST)
            fail("cannot create the output folder '%s': %s", folder.c_str(), strerror(errno));
    }
    lock_folder(o.out.c_str(), "train_gpt");
    // A run killed while it saved left its temporary copy; holding the lock, this run is the only
    // writer, so it goes.
    for (const std::string& path : {r.latest, r.best, r.metrics_path, r.svg_path})
        remove_temporary_copies(path.c_str());
    struct stat info;
    if (!o.resume && stat(r.latest.c_str(), &info) == 0)
        fprintf(stderr,
                "train_gpt: note: '%s' holds an earlier run; this one replaces its files "
                "(--resume continues it instead)\n",
                o.out.c_str());
}

// --resume: the checkpoint, checked against the flags.
static void resume_run(Run& r) {
    const Options& o = r.o;
    load_checkpoint(r.latest, &r.model, &r.tokenizer, &r.adam, &r.state, o, r.job);
    check_model_flags(o, r.model.config, r.latest, "--resume", false);
    if (!o.tokenizer.empty()) {
        Tokenizer given;
        tokenizer_load(&given, o.tokenizer.c_str());
        if (tokenizer_fingerprint(&given) != tokenizer_fingerprint(&r.tokenizer))
            fail("--tokenizer '%s' is not the tokenizer the checkpoint '%s' was trained with",
                 o.tokenizer.c_str(), r.latest.c_str());
    }
    if (r.state.step > o.steps)
        fail("--resume: the checkpoint '%s' is at step %lld, past --steps %ld", r.latest.c_str(),
             (long long)r.state.step, o.steps);
    check_memory(r.model.config, o, r.job);
    r.micro_batches = r.state.micro_batches;
    printf("resuming from %s at step %lld\n", r.latest.c_str(), (long long)r.state.step);
    // The checkpoint holds the model's flags, not the training ones (--batch, --lr, ...).
    if (r.job.rank == 0)
        fprintf(stderr,
                "train_gpt: note: the training flags are this command's; give the ones the run "
                "was started with to continue it unchanged\n");
}

// A new model from the flags and the tokenizer, and an optimizer for this rank's part of it.
static void create_run(Run& r) {
    Options& o = r.o;
    tokenizer_load(&r.tokenizer, o.tokenizer.c_str());
    if (o.vocab_size && o.vocab_size != r.tokenizer.vocab_size)
        fail("--vocab-size %d does not match the tokenizer '%s', which has %d tokens", o.vocab_size,
             o.tokenizer.c_str(), r.tokenizer.vocab_size);
    o.model.vocab_size = r.tokenizer.vocab_size;
    if (o.init.empty()) {
        gpt_check_config(o.model);
        check_memory(o.model, o, r.job);
        gpt_create(&r.model, o.model);
        gpt_init(&r.model, o.seed);
    } else {
        init_from_file(o, &r.model, r.tokenizer);
        check_memory(r.model.config, o, r.job);
        printf("starting from the parameters of %s\n", o.init.c_str());
    }
    Shard shard = optimizer_shard(o, r.job, r.model.params.size);
    adamw_create(&r.adam, shard.count, shard.offset);
    parameters_shard_master(r.model.params, shard.offset, shard.count);
}

// Rank 0's metrics so far (on resume, the rows up to the checkpoint), open for appending.
static void open_metrics(Run& r) {
    if (r.job.rank != 0) return;
    r.rows = r.o.resume ? read_metrics(r.metrics_path, r.state.step) : std::vector<MetricRow>();
    if (!r.rows.empty() && r.rows.back().step == r.state.step)
        r.row = r.rows.back(), r.rows.pop_back();
    write_metrics(r.metrics_path, r.rows);
    r.metrics = fopen(r.metrics_path.c_str(), "a");
    if (!r.metrics) fail("cannot append to '%s': %s", r.metrics_path.c_str(), strerror(errno));
}

// The output folder, the model, tokenizer and optimizer (fresh or resumed), the data, checked
// against each other, and the metrics so far.
static void start_run(Run& r) {
    const Options& o = r.o;
    open_output(r);
    if (o.resume) resume_run(r);
    else create_run(r);
    const GPTConfig& c = r.model.config;
    r.adam.beta1 = o.beta1, r.adam.beta2 = o.beta2, r.adam.weight_decay = o.weight_decay;
    if (sizeof(floatX) < sizeof(real))
        cuda_check(cudaMalloc(&r.grad_sum, r.model.params.size * sizeof(real)));
    uint32_t fingerprint = tokenizer_fingerprint(&r.tokenizer);
    std::string tokenizer_name =
        o.resume ? "the checkpoint's (" + r.latest + ")" : "'" + o.tokenizer + "'";
    dataloader_open(&r.train, o.train.c_str(), o.batch, c.context, c.vocab_size,
                    DataLoaderMode::random, o.seed, fingerprint, tokenizer_name.c_str());
    dataloader_open(&r.val, o.val.c_str(), o.batch, c.context, c.vocab_size, DataLoaderMode::sweep,
                    0, fingerprint, tokenizer_name.c_str());
    if (r.job.rank == 0) note_unrecorded_tokenizers(r.train, r.val);
    r.row = MetricRow{r.state.step, NAN, NAN, NAN, NAN, NAN, NAN};
    open_metrics(r);
}

// The training state as of `step` completed steps.
static void remember(Run& r, long step) {
    r.state.step = step, r.state.optimizer_step = r.adam.step;
    r.state.micro_batches = r.micro_batches;
    r.state.elapsed_seconds = r.elapsed_before + seconds_now() - r.run_start;
}

// After `step` completed steps: evaluate, keep the best and latest checkpoints, redraw the curve.
static void evaluate_and_save(Run& r, long step, MetricRow& row, int* device_batch) {
    if (r.on_terminal) printf("\r\033[K");
    printf("step %ld: evaluating (%d batches)...%s", step, r.o.eval_steps,
           r.on_terminal ? "" : "\n");
    fflush(stdout);
    double val_loss = evaluate(r, device_batch);
    if (r.on_terminal) printf("\r\033[K");
    printf("step %ld: val loss %.4f%s\n", step, val_loss,
           val_loss < r.state.best_val_loss ? " (best so far)" : "");
    if (!std::isfinite(val_loss))
        fail("step %ld: validation loss is %g; stopping (last good checkpoint: %s)", step, val_loss,
             r.latest.c_str());
    row.val_loss = val_loss;
    remember(r, step);
    if (val_loss < r.state.best_val_loss) {
        r.state.best_val_loss = val_loss;
        save_checkpoint(r.best, r.model, r.tokenizer, r.adam, r.state, r.job);
    }
    save_checkpoint(r.latest, r.model, r.tokenizer, r.adam, r.state, r.job);
}

// Console lines: a progress bar on a terminal, otherwise a log line every log_every steps.
static void report_step(Run& r, long step, double loss, float lr, double grad_norm, double seconds,
                        long tokens) {
    const Options& o = r.o;
    if (step > r.first_step)
        r.step_seconds_total += seconds, r.timed_steps++;  // the first warms up
    double mean_step = r.timed_steps ? r.step_seconds_total / r.timed_steps : seconds;
    double eta = mean_step * (o.steps - step - 1);
    if (r.timed_steps == 3)
        printf("%stiming: %.1f ms per step, about %s for the remaining %ld steps\n",
               r.on_terminal ? "\r\033[K" : "", mean_step * 1e3, duration_text(eta).c_str(),
               o.steps - step - 1);
    if (r.on_terminal) {
        int width = 24, filled = int(width * double(step + 1) / o.steps);
        printf("\r[%s%s] step %ld/%ld | loss %.4f | lr %.2e | %.0f tok/s | ETA %s \033[K",
               std::string(filled, '=').c_str(), std::string(width - filled, ' ').c_str(), step + 1,
               o.steps, loss, lr, tokens / seconds, duration_text(eta).c_str());
    } else if ((step + 1) % o.log_every == 0 || step == r.first_step) {
        printf(
            "step %ld/%ld | loss %.4f | lr %.2e | grad norm %.3f | %.1f ms | %.0f tok/s | ETA %s\n",
            step + 1, o.steps, loss, lr, grad_norm, seconds * 1e3, tokens / seconds,
            duration_text(eta).c_str());
    }
    fflush(stdout);
}

// Within a step of many micro-batches: where it is and how long the step will take, after micro-
// batches 1, 2, 4, 8, ... of the run's first step (nothing is known about the speed yet), and then
// every 5 seconds (on a terminal, every half second).
static std::function<void(int)> micro_batch_progress(Run& r, long step, double start) {
    double last = start;
    return [&r, step, start, last](int done) mutable {
        double now = seconds_now();
        bool early = step == r.first_step && (done & (done - 1)) == 0;
        if (r.o.grad_accum == 1 || (!early && now - last < (r.on_terminal ? 0.5 : 5))) return;
        last = now;
        double step_eta = (now - start) / done * (r.o.grad_accum - done);
        printf("%sstep %ld/%ld: micro-batch %d/%d, %s left in this step%s",
               r.on_terminal ? "\r\033[K" : "", step + 1, r.o.steps, done, r.o.grad_accum,
               duration_text(step_eta).c_str(), r.on_terminal ? "" : "\n");
        fflush(stdout);
    };
}

// Rank 0 appends a row to metrics.csv, and redraws the curve after an evaluation.
static void write_metrics_row(Run& r, const MetricRow& row, bool evaluated) {
    r.rows.push_back(row);
    fputs(metrics_line(row).c_str(), r.metrics);
    fflush(r.metrics);
    if (evaluated) write_loss_svg(r.svg_path, r.rows);
}

// The loop. Row s of metrics.csv holds the loss of step s (steps count from 1) and the validation
// loss after s steps; the console counts steps the same way.
static void run_training(Run& r) {
    const Options& o = r.o;
    const GPTConfig& c = r.model.config;
    long tokens_per_step = long(o.batch) * c.context * o.grad_accum;
    int* device_batch = device_alloc<int>(2 * size_t(o.batch) * c.context);
    real* step_values = device_alloc<real>(2);  // the step's loss and gradient norm
    r.run_start = seconds_now(), r.elapsed_before = r.state.elapsed_seconds,
    r.first_step = r.state.step;
    MetricRow& row = r.row;
    for (long step = r.state.step;; step++) {
        bool evaluate_now = o.eval_interval > 0 && (step % o.eval_interval == 0 || step == o.steps);
        if (evaluate_now) evaluate_and_save(r, step, row, device_batch);
        if (step == o.steps &&
            o.eval_interval == 0) {  // no evaluations: the final model is the best known
            remember(r, step);
            save_checkpoint(r.latest, r.model, r.tokenizer, r.adam, r.state, r.job);
            save_checkpoint(r.best, r.model, r.tokenizer, r.adam, r.state, r.job);
        }
        if (r.job.rank == 0) write_metrics_row(r, row, evaluate_now);
        if (o.sample_every > 0 && step > 0 && step % o.sample_every == 0 && o.sample_tokens > 0 &&
            r.job.rank == 0)
            print_sample(r.model, r.tokenizer, o.sample_tokens, o.seed + uint64_t(step));
        if (step == o.steps) break;

        profiling = o.profile && step > r.first_step;  // the first step warms up
        double step_start = seconds_now();
        real grad_norm;
        double loss = train_step(r, device_batch, step_values, step, &grad_norm,
                                 micro_batch_progress(r, step, step_start));
        float lr = learning_rate(step, o.warmup, o.steps, o.lr, o.min_lr);
        profiling = false;
        double seconds = seconds_now() - step_start;
        row = MetricRow{step + 1,
                        loss,
                        NAN,
                        lr,
                        double(grad_norm),
                        tokens_per_step / seconds,
                        r.elapsed_before + seconds_now() - r.run_start};
        report_step(r, step, loss, lr, grad_norm, seconds, tokens_per_step);
    }
}

// Every rank must run the same command: its flags in order, as (flag, value) pairs, and its build.
static Settings flag_settings(int argc, char** argv) {
    Settings settings = {{"precision", sizeof(floatX) < sizeof(real) ? "bfloat16" : "float"}};
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        bool has_value = i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0;
        settings.push_back({flag, has_value ? argv[++i] : ""});
    }
    return settings;
}

// ... and find the same files, model and starting point: a machine with other data, or a stale
// checkpoint where --out is not shared, is caught here rather than trained on.
static Settings run_settings(Run& r) {
    const Parameters& p = r.model.params;
    std::vector<floatX> values(p.size);
    cuda_check(cudaMemcpy(values.data(), p.data, p.size * sizeof(floatX), cudaMemcpyDeviceToHost));
    auto tokens = [](const DataLoader& d) {
        return std::to_string(d.file.num_tokens) + " tokens, tokenizer " +
               std::to_string(d.file.tokenizer_fingerprint);
    };
    return {{"training file", tokens(r.train)},
            {"validation file", tokens(r.val)},
            {"tokenizer", std::to_string(tokenizer_fingerprint(&r.tokenizer))},
            {"starting step", std::to_string(r.state.step)},
            {"parameters", std::to_string(p.size) + ", CRC-32 " +
                               std::to_string(crc32(values.data(), p.size * sizeof(floatX)))}};
}

static void train_run(Run& r, int argc, char** argv) {
    r.o = parse_options(argc, argv);
    const Options& o = r.o;
    check_same_on_every_rank(flag_settings(argc, argv));
    if (o.grad_accum % r.job.ranks != 0)
        fail(
            "--grad-accum %d is not a multiple of the %d ranks (each rank runs grad-accum / ranks "
            "of a step's micro-batches)",
            o.grad_accum, r.job.ranks);
    if (o.threads) {
#ifdef __CUDACC__
        if (r.job.rank == 0)
            fprintf(stderr, "train_gpt: note: --threads only applies to the CPU build\n");
#else
        omp_set_num_threads(o.threads);
#endif
    }
    start_run(r);
    check_same_on_every_rank(run_settings(r));
    const GPTConfig& c = r.model.config;
    // mpirun gives its ranks a pseudo-terminal whatever its own output is: log lines there.
    r.on_terminal = isatty(fileno(stdout)) && !r.job.mpi;
    printf("model: %d layers, %d heads, dim %d, context %d, vocab %d: %.2fM parameters\n", c.layers,
           c.heads, c.dim, c.context, c.vocab_size, gpt_parameter_count(c) / 1e6);
    printf(
        "training: %ld steps of %d x %d sequences of %d tokens (%ld tokens per step); train %zu "
        "tokens, val "
        "%zu tokens\n",
        o.steps, o.grad_accum, o.batch, c.context, long(o.batch) * c.context * o.grad_accum,
        r.train.file.num_tokens, r.val.file.num_tokens);
    printf("matrix products: %s\n", gemm_engine().c_str());
    if (r.job.ranks > 1)
        printf(
            "data parallel: %d ranks (%s), each running %d of a step's %d micro-batches, "
            "AdamW's state %s\n",
            r.job.ranks, job_transport(), o.grad_accum / r.job.ranks, o.grad_accum,
            o.zero ? "sharded (ZeRO-1)" : "on every rank");
    run_training(r);
    if (o.profile && r.timed_steps > 0) {
        printf("profile over %ld steps (%.3f ms per step measured around the step):\n",
               r.timed_steps, r.step_seconds_total / r.timed_steps * 1e3);
        profile_report(stdout, r.timed_steps);
    }
    double total = seconds_now() - r.run_start;
    char best[32] = "none (no evaluation)";
    if (std::isfinite(r.state.best_val_loss))
        snprintf(best, sizeof best, "%.4f", r.state.best_val_loss);
    printf("done: %ld steps in %s (%.1f ms per step), best val loss %s; checkpoints in %s\n",
           o.steps - r.first_step, duration_text(total).c_str(),
           r.timed_steps ? r.step_seconds_total / r.timed_steps * 1e3 : 0.0, best, o.out.c_str());
}

// With several ranks, only rank 0 prints; an error on any rank ends them all, naming it.
static int train(int argc, char** argv) {
    Run r;
    r.job = job_start("train_gpt");
    try {
        if (r.job.rank != 0 && !freopen("/dev/null", "w", stdout))
            fail("cannot silence this rank's output: %s", strerror(errno));
        train_run(r, argc, argv);
    } catch (const std::exception& error) {
        if (r.job.mpi) job_abort(error.what());
        throw;
    }
    job_end();
    return 0;
}

int main(int argc, char** argv) { return run_program("train_gpt", help_text, argc, argv, train); }
