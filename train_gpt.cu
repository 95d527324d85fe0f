// train_gpt.cu — trains a GPT on token files: gradient accumulation, AdamW with warmup and cosine
// decay, clipping, evaluation, samples, metrics (CSV and an SVG loss curve) and checkpoints that
// survive a crash and resume exactly.
#include "tricycle.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static const char* help_text =
    "usage: train_gpt --train FILE.bin --val FILE.bin --tokenizer FILE.tok [flags]\n"
    "\n"
    "Trains a GPT on token files made by `tokenizer encode`. Writes OUT/latest.bin (every "
    "evaluation and\n"
    "at the end), OUT/best.bin (lowest validation loss), OUT/metrics.csv and OUT/loss.svg. "
    "Checkpoints\n"
    "hold the config, tokenizer, parameters, optimizer state, step and random state; --resume "
    "continues\n"
    "from OUT/latest.bin (run the same command again with --resume).\n"
    "\n"
    "data and output:\n"
    "  --train FILE          training tokens               --val FILE        validation tokens\n"
    "  --tokenizer FILE.tok  the tokenizer of those files  --out DIR         output folder "
    "(default out)\n"
    "  --resume              continue from OUT/latest.bin\n"
    "model (a preset, then overrides):\n"
    "  --preset NAME         debug | shakespeare | smol (default shakespeare)\n"
    "  --layers N  --heads N  --dim N  --context N       sizes\n"
    "  --vocab-size N        must equal the tokenizer's vocabulary (default: taken from it)\n"
    "  --dropout P           dropout on embeddings and residual branches (attention: "
    "--attention-dropout P)\n"
    "  --norm layernorm|rmsnorm   --activation gelu|swiglu   --rotary   --untied\n"
    "  --attention plain|flash     attention kernels (same results; default flash on a GPU, plain "
    "on the CPU)\n"
    "training:\n"
    "  --batch N  --grad-accum N  --steps N                sequences per micro-batch, "
    "micro-batches per step\n"
    "  --lr X  --min-lr X  --warmup N                      linear warmup, then cosine decay to "
    "min-lr\n"
    "  --weight-decay X  --beta1 X  --beta2 X  --clip X    AdamW; clip the global gradient norm "
    "(0: off)\n"
    "  --seed N                                            initialisation, batches and dropout\n"
    "  --eval-interval N  --eval-steps N                   validation every N steps, over N "
    "batches\n"
    "  --sample-every N  --sample-tokens N                 print a sample every N steps (0: "
    "never)\n"
    "  --log-every N                                       a log line every N steps when not on a "
    "terminal\n"
    "  --threads N                                         CPU build: cores to use (default: all)\n"
    "  --profile                                           time every kernel and matrix product; "
    "print a table\n";

// ----------------------------------------------------------------------------------------------------
// Options

struct Options {
    std::string preset = "shakespeare", train, val, tokenizer, out = "out";
    bool resume = false;
    GPTConfig model;
    int vocab_size = 0;  // 0: the tokenizer's
    int batch = 64, grad_accum = 1;
    long steps = 5000, warmup = 100;
    float lr = 1e-3f, min_lr = 1e-4f, weight_decay = 0.1f, beta1 = 0.9f, beta2 = 0.99f, clip = 1.0f;
    uint64_t seed = 1337;
    int eval_interval = 250, eval_steps = 20, sample_every = 0, sample_tokens = 200, log_every = 10,
        threads = 0;
    bool profile = false;
};

// Each preset brings a model and training defaults that suit it.
static Options preset_options(const std::string& preset) {
    Options o;
    o.preset = preset;
    o.model = gpt_preset(preset);
    if (preset == "debug") {
        o.batch = 8, o.steps = 200, o.warmup = 20, o.eval_interval = 50, o.eval_steps = 5;
    } else if (preset ==
               "smol") {  // the seed's smol GPT: 4 x 128 micro-batches of 1024 tokens per step
        o.batch = 4, o.grad_accum = 128, o.steps = 10000, o.warmup = 150, o.lr = 6e-4f,
        o.min_lr = 6e-5f, o.beta2 = 0.95f;
        o.eval_interval = 250, o.eval_steps = 20;
    }
    return o;
}

static Options parse_options(int argc, char** argv) {
    std::string preset = "shakespeare";
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--preset")) preset = argv[i + 1];
    Options o = preset_options(preset);
    GPTConfig& m = o.model;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        auto value = [&] { return flag_value(argc, argv, &i); };
        auto integer = [&](long min, long max) {
            return parse_int(flag.c_str(), value(), min, max);
        };
        auto number = [&](double min, double max) {
            return float(parse_number(flag.c_str(), value(), min, max));
        };
        if (flag == "--preset") value();
        else if (flag == "--train") o.train = value();
        else if (flag == "--val") o.val = value();
        else if (flag == "--tokenizer") o.tokenizer = value();
        else if (flag == "--out") o.out = value();
        else if (flag == "--resume") o.resume = true;
        else if (flag == "--layers") m.layers = int(integer(1, 1000));
        else if (flag == "--heads") m.heads = int(integer(1, 1000));
        else if (flag == "--dim") m.dim = int(integer(1, 1 << 16));
        else if (flag == "--context") m.context = int(integer(1, 1 << 20));
        else if (flag == "--vocab-size") o.vocab_size = int(integer(1, 1 << 30));
        else if (flag == "--dropout") m.dropout = number(0, 0.99);
        else if (flag == "--attention-dropout") m.attention_dropout = number(0, 0.99);
        else if (flag == "--norm") {
            std::string v = value();
            if (v != "layernorm" && v != "rmsnorm")
                fail("flag --norm expects layernorm or rmsnorm, got '%s'", v.c_str());
            m.norm = v == "rmsnorm" ? Norm::rmsnorm : Norm::layernorm;
        } else if (flag == "--activation") {
            std::string v = value();
            if (v != "gelu" && v != "swiglu")
                fail("flag --activation expects gelu or swiglu, got '%s'", v.c_str());
            m.activation = v == "swiglu" ? Activation::swiglu : Activation::gelu;
        } else if (flag == "--attention") {
            std::string v = value();
            if (v != "plain" && v != "flash")
                fail("flag --attention expects plain or flash, got '%s'", v.c_str());
            use_flash_attention = v == "flash";
        } else if (flag == "--rotary") m.rotary = true;
        else if (flag == "--untied") m.tied_embeddings = false;
        else if (flag == "--batch") o.batch = int(integer(1, 1 << 20));
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
        else if (flag == "--profile") o.profile = true;
        else unknown_flag(argv[i]);
    }
    if (o.train.empty() || o.val.empty())
        fail("--train and --val are required (token files from `tokenizer encode`)");
    if (o.tokenizer.empty() && !o.resume)
        fail("--tokenizer is required (the .tok file the token files were made with)");
    if (o.min_lr > o.lr) fail("--min-lr %g is above --lr %g", o.min_lr, o.lr);
    return o;
}

// ----------------------------------------------------------------------------------------------------
// Checkpoints: the model file with sections for the tokenizer, AdamW's moments and the training
// state.

struct TrainingState {
    int64_t step = 0;            // steps completed
    int64_t optimizer_step = 0;  // AdamW's bias-correction counter
    uint64_t train_rng = 0;      // the training loader's random state
    double best_val_loss = INFINITY;
    double elapsed_seconds = 0;  // training time before this run
};

static FileSection section(const char* tag, std::string bytes) {
    FileSection s;
    memcpy(s.tag, tag, 4);
    s.bytes = std::move(bytes);
    return s;
}

static void save_checkpoint(const std::string& path, GPT& model, const Tokenizer& tokenizer,
                            const AdamW& adam, const TrainingState& state) {
    std::vector<FileSection> sections = {
        section("TOKN", tokenizer_serialize(&tokenizer)),
        section("ADMM", floats_section(adam.m, adam.n)),
        section("ADMV", floats_section(adam.v, adam.n)),
        section("TRAN", std::string((const char*)&state, sizeof state))};
    if (model.params.master)
        sections.push_back(section(
            "MAST", floats_section(model.params.master, model.params.size)));  // mixed precision
    gpt_save(model, path.c_str(), sections);
}

static void load_checkpoint(const std::string& path, GPT* model, Tokenizer* tokenizer, AdamW* adam,
                            TrainingState* state) {
    std::vector<FileSection> sections;
    gpt_load(model, path.c_str(), &sections);
    adamw_create(adam, model->params.size);
    int found = 0;
    for (const FileSection& s : sections) {
        std::string tag(s.tag, 4);
        if (tag == "TOKN") tokenizer_parse(tokenizer, s.bytes, path.c_str()), found |= 1;
        else if (tag == "ADMM") floats_from_section(adam->m, adam->n, s, path.c_str()), found |= 2;
        else if (tag == "ADMV") floats_from_section(adam->v, adam->n, s, path.c_str()), found |= 4;
        else if (tag == "TRAN" && s.bytes.size() == sizeof *state)
            memcpy(state, s.bytes.data(), sizeof *state), found |= 8;
        else if (tag == "MAST" && model->params.master)
            floats_from_section(model->params.master, model->params.size, s, path.c_str());
    }
    if (found != 15)
        fail(
            "checkpoint '%s': lacks the tokenizer, optimizer or training state (a weights-only "
            "file cannot be resumed)",
            path.c_str());
    adam->step = state->optimizer_step;
}

// ----------------------------------------------------------------------------------------------------
// Metrics: a CSV row per step, and a loss curve drawn as SVG at every evaluation.

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

// On resume, keep the rows of steps before the checkpoint (a crash may have left later ones).
static std::vector<MetricRow> read_metrics(const std::string& path, long before_step) {
    std::vector<MetricRow> rows;
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
        std::vector<double> fields;
        std::stringstream ss(line);
        std::string field;
        while (std::getline(ss, field, ','))
            fields.push_back(field.empty() ? NAN : atof(field.c_str()));
        while (fields.size() < 7) fields.push_back(NAN);
        MetricRow r{long(fields[0]), fields[1], fields[2], fields[3],
                    fields[4],       fields[5], fields[6]};
        if (r.step < before_step) rows.push_back(r);
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

// Mean loss over the first eval_steps batches of the validation file (the same batches every time).
static double evaluate(GPT& model, GPTActivations& acts, DataLoader& val, int* device_batch,
                       int eval_steps) {
    dataloader_reset(&val);
    double total = 0;
    for (int i = 0; i < eval_steps; i++) {
        dataloader_next_batch(&val);
        int n = val.B * val.T;
        cuda_check(
            cudaMemcpy(device_batch, val.inputs.data(), n * sizeof(int), cudaMemcpyHostToDevice));
        cuda_check(cudaMemcpy(device_batch + n, val.targets.data(), n * sizeof(int),
                              cudaMemcpyHostToDevice));
        MemoryMark mark = memory_mark();
        gpt_forward(model, acts, device_batch, val.B, val.T, false, 0);
        total += gpt_loss(acts, device_batch + n, model.config.vocab_size);
        memory_release(mark);
    }
    return total / eval_steps;
}

// One optimizer step: grad_accum micro-batches, each contributing 1/grad_accum of the loss, then
// the gradient norm, and AdamW with clipping. Returns the loss; the norm is left in grad_norm.
static double train_step(GPT& model, GPTActivations& acts, AdamW& adam, DataLoader& loader,
                         int* device_batch, real* norm, const Options& o, long step,
                         real* grad_norm) {
    int B = loader.B, T = loader.T;
    double loss_sum = 0;
    parameters_zero_grad(model.params);
    for (int micro = 0; micro < o.grad_accum; micro++) {
        dataloader_next_batch(&loader);
        cuda_check(cudaMemcpy(device_batch, loader.inputs.data(), size_t(B) * T * sizeof(int),
                              cudaMemcpyHostToDevice));
        cuda_check(cudaMemcpy(device_batch + B * T, loader.targets.data(),
                              size_t(B) * T * sizeof(int), cudaMemcpyHostToDevice));
        MemoryMark mark = memory_mark();
        uint64_t dropout_seed = random_bits(o.seed, uint64_t(step) * o.grad_accum + micro);
        gpt_forward(model, acts, device_batch, B, T, true, dropout_seed);
        gpt_backward(model, acts, device_batch + B * T, real(1.0 / o.grad_accum));
        real loss;
        cuda_check(cudaMemcpy(&loss, acts.loss, sizeof loss, cudaMemcpyDeviceToHost));
        loss_sum += double(loss) / o.grad_accum;
        memory_release(mark);
    }
    gradient_norm(norm, model.params.grad, model.params.size);
    cuda_check(cudaMemcpy(grad_norm, norm, sizeof *grad_norm, cudaMemcpyDeviceToHost));
    if (!std::isfinite(loss_sum) || !std::isfinite(*grad_norm))
        fail(
            "step %ld: the loss is %g and the gradient norm %g; stopping before the update (the "
            "last good checkpoint is in %s)",
            step, loss_sum, double(*grad_norm), o.out.c_str());
    float lr = learning_rate(step, o.warmup, o.steps, o.lr, o.min_lr);
    adamw_update(&adam, model.params, lr, norm, o.clip);
    cuda_check(cudaDeviceSynchronize());
    return loss_sum;
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

static int train(int argc, char** argv) {
    Options o = parse_options(argc, argv);
    if (o.threads) {
#ifdef __CUDACC__
        fprintf(stderr, "train_gpt: note: --threads only applies to the CPU build\n");
#else
        omp_set_num_threads(o.threads);
#endif
    }
    for (size_t slash = 0; slash != std::string::npos;) {  // mkdir -p
        slash = o.out.find('/', slash + 1);
        std::string folder = o.out.substr(0, slash);
        if (mkdir(folder.c_str(), 0755) != 0 && errno != EEXIST)
            fail("cannot create the output folder '%s': %s", folder.c_str(), strerror(errno));
    }
    std::string latest = o.out + "/latest.bin", best = o.out + "/best.bin",
                metrics_path = o.out + "/metrics.csv", svg_path = o.out + "/loss.svg";

    GPT model;
    Tokenizer tokenizer;
    AdamW adam;
    TrainingState state;
    if (o.resume) {
        load_checkpoint(latest, &model, &tokenizer, &adam, &state);
        printf("resuming from %s at step %lld\n", latest.c_str(), (long long)state.step);
    } else {
        tokenizer_load(&tokenizer, o.tokenizer.c_str());
        if (o.vocab_size && o.vocab_size != tokenizer.vocab_size)
            fail("--vocab-size %d does not match the tokenizer '%s', which has %d tokens",
                 o.vocab_size, o.tokenizer.c_str(), tokenizer.vocab_size);
        o.model.vocab_size = tokenizer.vocab_size;
        gpt_create(&model, o.model);
        gpt_init(&model, o.seed);
        adamw_create(&adam, model.params.size);
    }
    adam.beta1 = o.beta1, adam.beta2 = o.beta2, adam.weight_decay = o.weight_decay;
    const GPTConfig& c = model.config;
    int B = o.batch, T = c.context;  // the model's context is the training sequence length

    DataLoader train_loader, val_loader;
    dataloader_open(&train_loader, o.train.c_str(), B, T, c.vocab_size, DataLoaderMode::random,
                    o.seed);
    dataloader_open(&val_loader, o.val.c_str(), B, T, c.vocab_size, DataLoaderMode::sweep, 0);
    if (o.resume) dataloader_set_rng_state(&train_loader, state.train_rng);
    std::vector<MetricRow> rows =
        o.resume ? read_metrics(metrics_path, state.step) : std::vector<MetricRow>();
    write_metrics(metrics_path, rows);
    FILE* metrics = fopen(metrics_path.c_str(), "a");
    if (!metrics) fail("cannot append to '%s': %s", metrics_path.c_str(), strerror(errno));

    long tokens_per_step = long(B) * T * o.grad_accum;
    printf("matrix products: %s\n", gemm_engine().c_str());
    printf("model: %d layers, %d heads, dim %d, context %d, vocab %d: %.2fM parameters\n", c.layers,
           c.heads, c.dim, c.context, c.vocab_size, model.params.size / 1e6);
    printf(
        "training: %ld steps of %d x %d sequences of %d tokens (%ld tokens per step); train %zu "
        "tokens, val %zu tokens\n",
        o.steps, o.grad_accum, B, T, tokens_per_step, train_loader.file.num_tokens,
        val_loader.file.num_tokens);

    GPTActivations acts;
    int* device_batch = device_alloc<int>(2 * size_t(B) * T);
    real* norm = device_alloc<real>(1);
    bool on_terminal = isatty(fileno(stdout));
    double run_start = seconds_now(), elapsed_before = state.elapsed_seconds,
           step_seconds_total = 0;
    long first_step = state.step, timed_steps = 0;
    auto remember = [&](long step) {  // the training state as of `step` completed steps
        state.step = step, state.optimizer_step = adam.step,
        state.train_rng = dataloader_get_rng_state(&train_loader);
        state.elapsed_seconds = elapsed_before + seconds_now() - run_start;
    };
    for (long step = state.step; step <= o.steps; step++) {
        bool evaluate_now = o.eval_interval > 0 && (step % o.eval_interval == 0 || step == o.steps);
        if (evaluate_now) {
            double val_loss = evaluate(model, acts, val_loader, device_batch, o.eval_steps);
            if (on_terminal) printf("\r\033[K");
            printf("step %ld: val loss %.4f%s\n", step, val_loss,
                   val_loss < state.best_val_loss ? " (best so far)" : "");
            if (!std::isfinite(val_loss))
                fail("step %ld: validation loss is %g; stopping (last good checkpoint: %s)", step,
                     val_loss, latest.c_str());
            remember(step);
            // the step's training fills in the rest
            rows.push_back({step, NAN, val_loss, NAN, NAN, NAN, state.elapsed_seconds});
            if (step == o.steps) fputs(metrics_line(rows.back()).c_str(), metrics);
            if (val_loss < state.best_val_loss) {
                state.best_val_loss = val_loss;
                save_checkpoint(best, model, tokenizer, adam, state);
            }
            save_checkpoint(latest, model, tokenizer, adam, state);
            write_loss_svg(svg_path, rows);
        }
        if (o.sample_every > 0 && step > 0 && step % o.sample_every == 0 && o.sample_tokens > 0)
            print_sample(model, tokenizer, o.sample_tokens, o.seed + uint64_t(step));
        if (step == o.steps) break;

        profiling =
            o.profile && step > first_step;  // the first step warms up; evaluations are not counted
        double step_start = seconds_now();
        real grad_norm;
        double loss_sum =
            train_step(model, acts, adam, train_loader, device_batch, norm, o, step, &grad_norm);
        float lr = learning_rate(step, o.warmup, o.steps, o.lr, o.min_lr);
        profiling = false;

        double seconds = seconds_now() - step_start,
               elapsed = elapsed_before + seconds_now() - run_start;
        if (step > first_step)
            step_seconds_total += seconds, timed_steps++;  // the first step warms caches up
        double mean_step = timed_steps ? step_seconds_total / timed_steps : seconds;
        double eta = mean_step * (o.steps - step - 1);
        MetricRow row{step,   loss_sum, NAN, lr, double(grad_norm), tokens_per_step / seconds,
                      elapsed};
        if (!rows.empty() && rows.back().step == step)
            row.val_loss = rows.back().val_loss, rows.back() = row;
        else rows.push_back(row);
        fputs(metrics_line(row).c_str(), metrics);
        fflush(metrics);
        if (timed_steps == 3)
            printf("%stiming: %.1f ms per step, about %s for the remaining %ld steps\n",
                   on_terminal ? "\r\033[K" : "", mean_step * 1e3, duration_text(eta).c_str(),
                   o.steps - step - 1);
        if (on_terminal) {
            int width = 24, filled = int(width * double(step + 1) / o.steps);
            printf("\r[%s%s] %ld/%ld | loss %.4f | lr %.2e | %.0f tok/s | ETA %s \033[K",
                   std::string(filled, '=').c_str(), std::string(width - filled, ' ').c_str(),
                   step + 1, o.steps, loss_sum, lr, tokens_per_step / seconds,
                   duration_text(eta).c_str());
            fflush(stdout);
        } else if ((step + 1) % o.log_every == 0 || step == first_step) {
            printf(
                "step %ld/%ld | loss %.4f | lr %.2e | grad norm %.3f | %.1f ms | %.0f tok/s | ETA "
                "%s\n",
                step + 1, o.steps, loss_sum, lr, double(grad_norm), seconds * 1e3,
                tokens_per_step / seconds, duration_text(eta).c_str());
            fflush(stdout);
        }
        if (o.eval_interval == 0 &&
            step + 1 == o.steps) {  // no evaluations: the final model is the best we know
            remember(step + 1);
            save_checkpoint(latest, model, tokenizer, adam, state);
            save_checkpoint(best, model, tokenizer, adam, state);
        }
    }
    if (o.profile && timed_steps > 0) {
        printf("profile over %ld steps (%.3f ms per step measured around the step):\n", timed_steps,
               step_seconds_total / timed_steps * 1e3);
        profile_report(stdout, timed_steps);
    }
    double total = seconds_now() - run_start;
    printf("done: %ld steps in %s (%.1f ms per step), best val loss %.4f; checkpoints in %s\n",
           o.steps - first_step, duration_text(total).c_str(),
           timed_steps ? step_seconds_total / timed_steps * 1e3 : 0.0, state.best_val_loss,
           o.out.c_str());
    fclose(metrics);
    return 0;
}

int main(int argc, char** argv) { return run_program("train_gpt", help_text, argc, argv, train); }
