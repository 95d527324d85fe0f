// tests/mixed_precision.cu — the bfloat16 build against the float build. Built twice: as
// tests/mixed_precision_fp32 (default types) and tests/mixed_precision_bf16 (-DTRICYCLE_BF16).
//
//   tests/mixed_precision_fp32 write FILE     computes the reference and writes it to FILE
//   tests/mixed_precision_bf16 compare FILE   computes the same in bfloat16 and checks it against
//   FILE
//   tests/mixed_precision_bf16 tensor-cores  checks the tensor-core flash attention against plain
//   attention (run also with TRICYCLE_LAUNCH_SHAPES=gpu)
// Both also check the loss, the gradient norm and clipping against plain loops, and that training
// steps after the first make no new matrix-product primitive.
//
// The same things both times, from the same seeds: the outputs of single layers (linear, layernorm,
// GELU, both attention kernels (flash also at a head size the bfloat16 build runs on tensor
// cores), cross-entropy), greedy generation and the losses of 20 AdamW steps
// of a small GPT (trained the way train_gpt trains, with gpt_forward and gpt_backward). Outputs
// must agree to within bfloat16's precision (8 bits of mantissa: 2^-8 relative per rounding, a few
// roundings deep), losses to within 2%.
#include "tricycle.h"
#include "tests/check.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

typedef std::map<std::string, std::vector<real>> Results;

static Tensor random(Shape shape, uint64_t seed, real std = 1) {
    return randn(shape, seed, 0, std);
}

static const char* precision_name() {
    return std::is_same<floatX, real>::value ? "float" : "bfloat16";
}

static void upload_values(floatX* device, const std::vector<real>& values) {
    std::vector<floatX> stored(values.begin(), values.end());
    cuda_check(
        cudaMemcpy(device, stored.data(), stored.size() * sizeof(floatX), cudaMemcpyHostToDevice));
}

static double download_value(const real* device) {
    real value;
    cuda_check(cudaMemcpy(&value, device, sizeof value, cudaMemcpyDeviceToHost));
    return value;
}

static Results compute() {
    Results results;
    NoGrad no_grad;
    Tensor x = random({4, 16, 48}, 1), w = random({96, 48}, 2, 0.1), b = random({96}, 3, 0.1);
    results["linear"] = to_host(linear(x, w, b));
    results["layernorm"] = to_host(layernorm(x, random({48}, 4), random({48}, 5)));
    results["gelu"] = to_host(gelu(x));
    Tensor qkv = random({2, 40, 3 * 32}, 6);
    for (bool flash : {false, true}) {
        attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
        results[flash ? "flash attention" : "plain attention"] =
            to_host(attention(qkv, 4, false, 0, 0));
    }
    // Heads of 64: in bfloat16 the flash kernels run on tensor cores, in float on the scalar path.
    attention_kernels = AttentionKernels::flash;
    results["flash attention, heads of 64, T=130"] =
        to_host(attention(random({2, 130, 3 * 128}, 9), 2, false, 0, 0));
    attention_kernels = AttentionKernels::fastest;
    Tensor logits = random({64, 70}, 7, 2);
    std::vector<int> host_targets(64);
    for (int i = 0; i < 64; i++) host_targets[i] = int(random_bits(8, i) % 70);
    int* targets = device_alloc<int>(64);
    cuda_check(cudaMemcpy(targets, host_targets.data(), sizeof(int) * 64, cudaMemcpyHostToDevice));
    results["cross-entropy"] = to_host(cross_entropy(logits, targets));
    return results;
}

// 30 tokens generated greedily, with the key/value cache, by a small GPT fresh from initialisation
// (trained models differ a little between precisions, and greedy decoding amplifies that); then 20
// AdamW steps of it on one fixed batch: the loss before each step.
static void generate_and_train(Results& results) {
    GPTConfig config;
    config.vocab_size = 97, config.context = 32, config.dim = 64, config.layers = 2,
    config.heads = 4;
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 11);
    Sampler greedy;
    greedy.temperature = 0;
    std::vector<int> context = {3, 14, 15, 92, 65};
    generate(model, context, 30, greedy, true, [](int) {});
    results["generated tokens"] = std::vector<real>(context.begin() + 5, context.end());
    AdamW adam;
    adamw_create(&adam, model.params.size);
    const int B = 4, T = 32;
    std::vector<int> host(2 * B * T);
    for (int i = 0; i < B * T + 1; i++)
        host[i] = int(random_bits(12, i / 3) % 97);  // repeats: something to learn
    for (int i = 0; i < B * T; i++) host[B * T + i] = host[i + 1];
    int* tokens = device_alloc<int>(host.size());
    cuda_check(cudaMemcpy(tokens, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice));
    real* norm = device_alloc<real>(1);
    std::vector<real>& losses = results["training losses"];
    GPTActivations acts;
    long layouts_after_first = 0;
    for (int step = 0; step < 20; step++) {
        if (step == 1) layouts_after_first = gemm_layouts_made();
        parameters_zero_grad(model.params);
        MemoryMark mark = memory_mark();
        gpt_forward(model, acts, tokens, B, T, true, 0);
        gpt_backward(model, acts, tokens + B * T, 1);
        losses.push_back(download_value(acts.loss));
        gradient_norm(norm, model.params.grad, model.params.size);
        adamw_update(&adam, model.params, real(1e-3), norm, 1);
        memory_release(mark);
    }
    check(gemm_layouts_made() == layouts_after_first,
          "%s: training steps 2-20 make no new matrix-product primitive (%ld made by step 1; %s)",
          precision_name(), layouts_after_first, gemm_engine().c_str());
}

// The training maths the build keeps in float, against plain loops over the stored values: the
// gradient norm, clipping inside AdamW (its first moments are clip * g exactly), a non-finite norm.
static void check_float_statistics() {
    const char* precision = precision_name();
    const int n = 10007;
    std::vector<real> gradient = to_host(randn({n}, 21, 0, real(0.01)));  // the values as stored
    Parameters params;
    parameters_create(&params, n);
    params.num_decayed = n / 2;
    Tensor weights = parameter(&params, {n});
    floatX* grads = weights.grad;
    upload_values(grads, gradient);
    double sum = 0;
    for (real g : gradient) sum += double(g) * g;
    double expected = std::sqrt(sum);
    real* norm = device_alloc<real>(1);
    gradient_norm(norm, grads, n);
    double got = download_value(norm);
    check(std::fabs(got - expected) <= 1e-5 * expected,
          "%s: gradient norm %.7g, a plain loop %.7g (relative 1e-5)", precision, got, expected);

    // Clipping to a quarter of the norm: AdamW's first step leaves m = (1 - beta1) * g * scale.
    AdamW adam;
    adamw_create(&adam, n);
    fill_normal(weights.data, n, 22, 0, 1);
    parameters_sync_master(params);
    real max_norm = real(expected / 4);
    adamw_update(&adam, params, real(1e-3), norm, max_norm);
    double scale = max_norm / (got + 1e-6), worst = 0;
    std::vector<real> m(n);
    cuda_check(cudaMemcpy(m.data(), adam.m, n * sizeof(real), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++)
        worst = std::max(worst,
                         std::fabs(m[i] - (1 - 0.9) * gradient[i] * scale) / (0.1 * 0.01 * scale));
    check(worst <= 1e-5,
          "%s: AdamW clips to max_norm = norm / 4: first moments within %.1e of a plain loop's (<= "
          "1e-5)",
          precision, worst);

    // A non-finite gradient gives a non-finite norm, which train_gpt stops on.
    real infinity = INFINITY;
    upload_values(grads + 17, std::vector<real>{infinity});
    gradient_norm(norm, grads, n);
    check(!std::isfinite(download_value(norm)),
          "%s: an infinite gradient makes the norm non-finite", precision);
    // ... and AdamW, given it, leaves the parameters, master weights and moments as they were.
    auto state = [&] {
        std::vector<real> values = to_host(weights), moments(2 * n);
        cuda_check(cudaMemcpy(moments.data(), adam.m, n * sizeof(real), cudaMemcpyDeviceToHost));
        cuda_check(
            cudaMemcpy(moments.data() + n, adam.v, n * sizeof(real), cudaMemcpyDeviceToHost));
        values.insert(values.end(), moments.begin(), moments.end());
        if (params.master) {
            std::vector<real> master(n);
            cuda_check(
                cudaMemcpy(master.data(), params.master, n * sizeof(real), cudaMemcpyDeviceToHost));
            values.insert(values.end(), master.begin(), master.end());
        }
        return values;
    };
    std::vector<real> before = state();
    adamw_update(&adam, params, real(1e-3), norm, max_norm);
    std::vector<real> after = state();
    check(before == after,
          "%s: AdamW with a non-finite norm changes no parameter, master weight or moment (%zu "
          "values)",
          precision, before.size());
}

// The loss: float, not rounded to the storage type.
static void check_float_loss() {
    const char* precision = precision_name();
    const int N = 64, V = 70;
    std::vector<real> logits = to_host(random({N, V}, 23, 2));
    floatX* device_logits = device_alloc<floatX>(N * V);
    upload_values(device_logits, logits);
    std::vector<int> host_targets(N);
    for (int i = 0; i < N; i++) host_targets[i] = int(random_bits(24, i) % V);
    int* targets = device_alloc<int>(N);
    cuda_check(cudaMemcpy(targets, host_targets.data(), N * sizeof(int), cudaMemcpyHostToDevice));
    double plain = 0;
    for (int r = 0; r < N; r++) {
        double largest = *std::max_element(logits.begin() + r * V, logits.begin() + (r + 1) * V),
               total = 0;
        for (int v = 0; v < V; v++) total += std::exp(logits[r * V + v] - largest);
        plain += largest + std::log(total) - logits[r * V + host_targets[r]];
    }
    plain /= N;
    real *loss = device_alloc<real>(1), *count = device_alloc<real>(1);
    classifier(device_logits, device_alloc<real>(N), loss, count, targets, N, V, V, 0, false);
    double loss_value = download_value(loss);
    check(std::fabs(loss_value - plain) <= 1e-5 * plain,
          "%s: cross-entropy loss %.7f in float, a plain loop %.7f (relative 1e-5; bfloat16 would "
          "be 4e-3)",
          precision, loss_value, plain);
}

// The training classifier (the loss, and the gradient written over the logits) against plain loops
// in double: dlogits = (softmax - onehot(target)) * scale / count, 0 for an ignored row and in the
// padding columns. On the GPU (and in its launch shapes) a block of 1024 threads holds a row of
// 1024 to 32,768 words (two bfloat16 or a float) in registers, and a warp reads any other row
// twice. The shapes: a small vocabulary (read twice); a row of 1 to 3 words per thread (held); one
// of exactly the 65,536 bfloat16 a block holds (held in bfloat16, read twice in float); one of an
// odd number of columns (not whole bfloat16 words) and one too long to hold (both read twice).
static void check_fused_classifier(int V, int padded_V) {
    const char* precision = precision_name();
    const int N = 5;
    const real scale = 0.5;
    floatX* device_logits = device_alloc<floatX>(long(N) * padded_V);
    upload_values(device_logits, to_host(random({N, padded_V}, 25, 3)));
    std::vector<real> logits = download(device_logits, long(N) * padded_V);  // as stored
    std::vector<int> host_targets = {ignore_index, V - 1};
    for (int i = 2; i < N; i++) host_targets.push_back(int(random_bits(26, i) % V));
    int* targets = device_alloc<int>(N);
    cuda_check(cudaMemcpy(targets, host_targets.data(), N * sizeof(int), cudaMemcpyHostToDevice));
    double plain_loss = 0, factor = scale / (N - 1);
    std::vector<double> plain_grad(long(N) * padded_V, 0);
    for (int r = 1; r < N; r++) {
        const real* row = logits.data() + long(r) * padded_V;
        double largest = *std::max_element(row, row + V), total = 0;
        for (int v = 0; v < V; v++) total += std::exp(row[v] - largest);
        double lse = largest + std::log(total);
        plain_loss += lse - row[host_targets[r]];
        for (int v = 0; v < V; v++)
            plain_grad[long(r) * padded_V + v] =
                (std::exp(row[v] - lse) - (v == host_targets[r])) * factor;
    }
    plain_loss /= N - 1;
    real *loss = device_alloc<real>(1), *count = device_alloc<real>(1);
    classifier(device_logits, device_alloc<real>(N), loss, count, targets, N, V, padded_V, scale,
               true);
    double loss_value = download_value(loss);
    std::vector<real> grad = download(device_logits, long(N) * padded_V);
    // Each gradient within its own rounding to the stored type (and fast_exp's error); zeros exact.
    double relative = std::is_same_v<floatX, float> ? 1e-4 : 1.0 / 128, worst = 0;
    bool zeros_exact = true;
    for (size_t i = 0; i < grad.size(); i++) {
        if (plain_grad[i] == 0) zeros_exact &= grad[i] == 0;
        else worst = std::max(worst, std::fabs(grad[i] - plain_grad[i]) / std::fabs(plain_grad[i]));
    }
    check(
        std::fabs(loss_value - plain_loss) <= 1e-5 * plain_loss && worst <= relative && zeros_exact,
        "%s: the training classifier, (%d, %d) logits of %d classes: loss %.7f (plain loops "
        "%.7f), each gradient within %.1e of a plain loop's (worst %.1e), the ignored row and "
        "the padding 0 (%s)",
        precision, N, padded_V, V, loss_value, plain_loss, relative, worst,
        zeros_exact ? "yes" : "no");
}

// Causal attention in double on the host, head by head, from the stored values of qkv (B, T, 3C)
// and of dout (B, T, C): out and dqkv = the gradient of sum(out * dout) with respect to qkv.
static void reference_attention(std::vector<double>& out, std::vector<double>& dqkv,
                                const std::vector<real>& qkv, const std::vector<real>& dout, int B,
                                int T, int C, int NH) {
    int hs = C / NH;
    double scale = 1 / std::sqrt(double(hs));
    out.assign(long(B) * T * C, 0), dqkv.assign(long(B) * T * 3 * C, 0);
    std::vector<double> p(T), dp(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            auto at = [&](int t, int part, int d) {
                return (long(b) * T + t) * 3 * C + part * C + h * hs + d;
            };
            auto dy = [&](int t, int d) {
                return double(dout[(long(b) * T + t) * C + h * hs + d]);
            };
            for (int t = 0; t < T; t++) {
                double largest = -INFINITY, total = 0, dot = 0;
                for (int s = 0; s <= t; s++) {
                    p[s] = 0;
                    for (int d = 0; d < hs; d++)
                        p[s] += double(qkv[at(t, 0, d)]) * qkv[at(s, 1, d)] * scale;
                    largest = std::max(largest, p[s]);
                }
                for (int s = 0; s <= t; s++) total += p[s] = std::exp(p[s] - largest);
                for (int s = 0; s <= t; s++) {
                    p[s] /= total, dp[s] = 0;
                    for (int d = 0; d < hs; d++) {
                        out[(long(b) * T + t) * C + h * hs + d] += p[s] * qkv[at(s, 2, d)];
                        dp[s] += dy(t, d) * qkv[at(s, 2, d)];
                        dqkv[at(s, 2, d)] += p[s] * dy(t, d);  // dv
                    }
                    dot += p[s] * dp[s];
                }
                for (int s = 0; s <= t; s++) {
                    double ds = p[s] * (dp[s] - dot) * scale;  // d(score) / sqrt(hs)
                    for (int d = 0; d < hs; d++) {
                        dqkv[at(t, 0, d)] += ds * qkv[at(s, 1, d)];
                        dqkv[at(s, 1, d)] += ds * qkv[at(t, 0, d)];
                    }
                }
            }
        }
}

// The largest difference between got and a reference, relative to the reference's largest value.
static double relative_error(const std::vector<real>& got, const std::vector<double>& reference) {
    double worst = 0, largest = 0;
    for (size_t i = 0; i < reference.size(); i++) {
        worst = std::max(worst, std::fabs(got[i] - reference[i]));
        largest = std::max(largest, std::fabs(reference[i]));
    }
    return got.size() == reference.size() ? worst / largest : INFINITY;
}

// Flash attention on tensor cores (the bfloat16 build, heads of 64 and 128), and plain attention in
// the same build, against attention computed in double from the same stored bfloat16 values:
// outputs, and the gradients of sum(out * w) with respect to qkv, for T from one query to four
// 64-row tiles, B * NH = 4 heads. The tensor cores round P, dS and the results to bfloat16 (2^-9
// relative each), plain attention its stored attention matrix, its gradient and the results: both
// land within a few 2^-9 of the largest value, and the bound is 1e-2 (2.6 * 2^-8) for both.
static void check_tensor_core_attention() {
    struct Case {
        int hs, T;
        bool rotary;
    };
    std::vector<Case> cases;
    for (int hs : tensor_core_head_sizes)  // every head size dispatch sends to tensor cores
        for (int T : {1, 17, 64, 130, 256}) cases.push_back({hs, T, false});
    cases.push_back({64, 130, true});
    for (const Case& c : cases) {
        const int B = 2, NH = 2, C = NH * c.hs;
        Tensor qkv = requires_grad(randn({B, c.T, 3 * C}, 40 + c.T + c.hs));
        Tensor weights = randn({B, c.T, C}, 41 + c.T + c.hs);
        std::vector<double> out, dqkv;
        if (!c.rotary)
            reference_attention(out, dqkv, to_host(qkv), to_host(weights), B, c.T, C, NH);
        double out_error[2], grad_error[2];  // plain, flash
        std::vector<real> outputs[2], grads[2];
        for (int flash = 0; flash < 2; flash++) {
            attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
            zero_grad(qkv);
            Tensor result = attention(qkv, NH, c.rotary, 0, 0);
            outputs[flash] = to_host(result);
            backward(sum(mul(result, weights)));
            grads[flash] = to_host(grad(qkv));
            if (!c.rotary) {
                out_error[flash] = relative_error(outputs[flash], out);
                grad_error[flash] = relative_error(grads[flash], dqkv);
            }
        }
        attention_kernels = AttentionKernels::fastest;
        const char* shapes = launching_gpu_shapes() ? ", GPU launch shapes" : "";
        if (c.rotary) {  // the rotation is the same for both: plain attention is the reference
            std::vector<double> plain_out(outputs[0].begin(), outputs[0].end()),
                plain_grad(grads[0].begin(), grads[0].end());
            double o = relative_error(outputs[1], plain_out),
                   g = relative_error(grads[1], plain_grad);
            check(o <= 2e-2 && g <= 2e-2,
                  "%s: tensor-core flash attention, head %d, T=%d, B=2, NH=2, rotary%s: output and "
                  "qkv gradient within %.1e and %.1e of plain attention's largest (<= 2e-2, both "
                  "round)",
                  precision_name(), c.hs, c.T, shapes, o, g);
            continue;
        }
        check(out_error[1] <= 1e-2 && grad_error[1] <= 1e-2 && out_error[0] <= 1e-2 &&
                  grad_error[0] <= 1e-2,
              "%s: tensor-core flash attention, head %d, T=%d, B=2, NH=2%s: output within %.1e and "
              "qkv gradient within %.1e of the largest in double (plain attention: %.1e, %.1e; <= "
              "1e-2)",
              precision_name(), c.hs, c.T, shapes, out_error[1], grad_error[1], out_error[0],
              grad_error[0]);
    }
}

// With attention dropout, flash attention at a head of 64 takes the scalar kernels, which draw the
// same mask as plain attention: the two agree to bfloat16's rounding.
static void check_dropout_fallback() {
    const int B = 2, T = 130, NH = 2, C = NH * 64;
    Tensor qkv = requires_grad(randn({B, T, 3 * C}, 51));
    Tensor weights = randn({B, T, C}, 52);
    std::vector<real> outputs[2], grads[2];
    for (int flash = 0; flash < 2; flash++) {
        attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
        zero_grad(qkv);
        Tensor result = attention(qkv, NH, false, 0.1, 7);
        outputs[flash] = to_host(result);
        backward(sum(mul(result, weights)));
        grads[flash] = to_host(grad(qkv));
    }
    attention_kernels = AttentionKernels::fastest;
    std::vector<double> plain_out(outputs[0].begin(), outputs[0].end()),
        plain_grad(grads[0].begin(), grads[0].end());
    double o = relative_error(outputs[1], plain_out), g = relative_error(grads[1], plain_grad);
    check(o <= 2e-2 && g <= 2e-2,
          "%s: flash attention with dropout 0.1 on the probabilities, head 64, T=130 (the scalar "
          "kernels): output and qkv gradient within %.1e and %.1e of plain attention's largest (<= "
          "2e-2)",
          precision_name(), o, g);
}

// The GPT's written-out backward (which writes dqkv rather than adding to it) with the tensor-core
// flash attention against plain attention: 2 layers, 2 heads of 64, T = 130 (three tiles). The loss
// and every parameter gradient, relative to the largest gradient; the whole model is in bfloat16 on
// both sides, so the bound is twice the single layer's, 2e-2.
static void check_tensor_core_gpt() {
    GPTConfig config;
    config.vocab_size = 97, config.context = 130, config.dim = 128, config.layers = 2,
    config.heads = 2;
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 13);
    const int B = 2, T = 130;
    std::vector<int> host(2 * B * T);
    for (int i = 0; i < 2 * B * T; i++) host[i] = int(random_bits(14, i) % 97);
    int* tokens = device_alloc<int>(host.size());
    cuda_check(cudaMemcpy(tokens, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice));
    std::vector<real> grads[2];
    double losses[2];
    for (int flash = 0; flash < 2; flash++) {
        attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
        parameters_zero_grad(model.params);
        MemoryMark mark = memory_mark();
        GPTActivations acts;
        gpt_forward(model, acts, tokens, B, T, true, 0);
        gpt_backward(model, acts, tokens + B * T, 1);
        losses[flash] = download_value(acts.loss);
        grads[flash] = download(model.params.grad, model.params.size);
        memory_release(mark);
    }
    attention_kernels = AttentionKernels::fastest;
    double largest = 0;
    for (real g : grads[0]) largest = std::max(largest, std::fabs(double(g)));
    double error = max_difference(grads[0], grads[1]) / largest;
    check(error <= 2e-2 && std::fabs(losses[1] - losses[0]) <= 1e-2 * losses[0],
          "%s: a GPT (2 layers, 2 heads of 64, T=130) with tensor-core flash attention: loss %.4f "
          "(plain %.4f), parameter gradients within %.1e of the largest (<= 2e-2)%s",
          precision_name(), losses[1], losses[0], error,
          launching_gpu_shapes() ? ", GPU launch shapes" : "");
}

static void write(const Results& results, const char* path) {
    std::string bytes;
    for (const auto& [name, values] : results) {
        std::vector<float> floats(values.begin(), values.end());
        int32_t header[2] = {int32_t(name.size()), int32_t(floats.size())};
        bytes.append(reinterpret_cast<const char*>(header), sizeof header);
        bytes += name;
        bytes.append(reinterpret_cast<const char*>(floats.data()), floats.size() * sizeof(float));
    }
    write_file_atomic(path, bytes.data(), bytes.size(), "reference file");
}

static Results read(const char* path) {
    std::string bytes = read_whole_file(path, "reference file");
    Results results;
    for (size_t at = 0; at + 8 <= bytes.size();) {
        int32_t header[2];
        memcpy(header, bytes.data() + at, sizeof header);
        at += sizeof header;
        std::string name = bytes.substr(at, header[0]);
        at += header[0];
        std::vector<float> floats(header[1]);
        memcpy(floats.data(), bytes.data() + at, floats.size() * sizeof(float));
        at += floats.size() * sizeof(float);
        results[name] = std::vector<real>(floats.begin(), floats.end());
    }
    return results;
}

static int run(int argc, char** argv) {
    if (argc == 2 && !strcmp(argv[1], "tensor-cores")) {
        check_tensor_core_attention();
        check_dropout_fallback();
        check_tensor_core_gpt();
        return finish();
    }
    if (argc != 3 || (strcmp(argv[1], "write") && strcmp(argv[1], "compare")))
        fail("usage: mixed_precision write|compare FILE, or mixed_precision tensor-cores");
    Results results = compute();
    generate_and_train(results);
    check_float_statistics();
    check_float_loss();
    for (auto [V, padded_V] :
         {std::pair{70, 72}, {3001, 3072}, {65500, 65536}, {71, 71}, {70000, 70016}})
        check_fused_classifier(V, padded_V);
    if (!strcmp(argv[1], "write")) {
        write(results, argv[2]);
        return finish();
    }
    Results reference = read(argv[2]);
    const char* precision = precision_name();
    for (const auto& [name, expected] : reference) {
        const std::vector<real>& got = results[name];
        bool same_size = got.size() == expected.size();
        double worst = 0, largest = 0;
        for (size_t i = 0; same_size && i < got.size(); i++) {
            double tolerance_scale = name == "training losses" ? std::fabs(expected[i]) : 1;
            worst = std::max(worst, std::fabs(double(got[i]) - expected[i]) / tolerance_scale);
            largest = std::max(largest, std::fabs(double(expected[i])));
        }
        if (name == "generated tokens") {
            long same = 0;
            for (size_t i = 0; same_size && i < got.size(); i++) same += got[i] == expected[i];
            check(same_size && same >= 24,
                  "%s: greedy generation with the key/value cache: %ld of 30 tokens as float's (>= "
                  "24)",
                  precision, same);
        } else if (name == "training losses") {
            check(same_size && worst <= 0.02,
                  "%s: 20 training steps, losses %.4f -> %.4f, within %.2f%% of float's (<= 2%%)",
                  precision, double(got.front()), double(got.back()), 100 * worst);
        } else {
            double relative = worst / std::max(largest, 1e-30);
            check(same_size && relative <= 0.02,
                  "%s: %s output within %.2e of float's largest value %.2f (<= 2e-2, bfloat16 "
                  "rounds at 4e-3)",
                  precision, name.c_str(), relative, largest);
        }
    }
    return finish();
}

int main(int argc, char** argv) {
    return run_program("mixed_precision",
                       "usage: tests/mixed_precision_{fp32,bf16} write|compare FILE\n"
                       "       tests/mixed_precision_bf16 tensor-cores\n",
                       argc, argv, run);
}
