// tokenizer.cu - the command-line tool around the byte-level BPE tokenizer.
//
//   tokenizer corpus  gather source files into one text, separated by <|endoftext|>
//   tokenizer train   learn merges from a text, write a .tok file
//   tokenizer encode  text -> PREFIX_train.bin + PREFIX_val.bin
//   tokenizer decode  .bin -> text on stdout
//
// Every error is one line on stderr, "tokenizer: error: ...", and exit status 1.
#include "tricycle.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

static const char* MAIN_HELP =
    "usage: tokenizer <command> [flags]\n"
    "\n"
    "Byte-level BPE tokenizer: learns merges over the 256 byte values, so any\n"
    "input (any bytes, invalid UTF-8 included) encodes and decodes exactly.\n"
    "\n"
    "commands:\n"
    "  corpus   gather the files under a directory into one text file\n"
    "  train    learn a tokenizer from a text file, write FILE.tok\n"
    "  encode   encode a text file into PREFIX_train.bin and PREFIX_val.bin\n"
    "  decode   decode a token file to stdout\n"
    "\n"
    "Run 'tokenizer <command> --help' for a command's flags.\n";

static const char* CORPUS_HELP =
    "usage: tokenizer corpus --dir DIR --output FILE [--ext .py] [--skip-dir NAME]...\n"
    "\n"
    "Concatenates every file under DIR whose name ends in EXT (default .py) into\n"
    "FILE, in sorted path order, so the result is the same on every run. Between\n"
    "two files it writes the separator \"<|endoftext|>\": training never merges\n"
    "across it, and encoding turns it into the end-of-text token (the only way\n"
    "that token is produced). Files that already contain the separator are\n"
    "skipped with a warning.\n"
    "\n"
    "  --dir DIR         directory to walk (symlinked directories are not followed)\n"
    "  --output FILE     corpus file to write\n"
    "  --ext EXT         file name ending to collect (default .py)\n"
    "  --skip-dir NAME   do not descend into directories named NAME (repeatable),\n"
    "                    e.g. --skip-dir site-packages for the Python stdlib\n";

static const char* TRAIN_HELP =
    "usage: tokenizer train --input FILE --vocab-size N --output FILE.tok\n"
    "       tokenizer train --bytes --output FILE.tok\n"
    "\n"
    "Learns byte-level BPE merges from FILE. Text is first cut into chunks (words\n"
    "with their leading space, digit runs, punctuation runs, whitespace runs) and\n"
    "merges never cross a chunk or a <|endoftext|> separator. Ties between pairs\n"
    "of equal count go to the smallest (left, right) ids, so training is\n"
    "deterministic. Prints timing on stderr.\n"
    "\n"
    "  --input FILE      training text\n"
    "  --vocab-size N    vocabulary size: 256 bytes + (N - 257) merges + 1\n"
    "                    end-of-text token (id N - 1); N >= 257. Fewer merges\n"
    "                    are learned if the text runs out of pairs.\n"
    "  --bytes           no merges: 256 byte tokens + end-of-text (vocab 257),\n"
    "                    i.e. a character-level tokenizer; needs no --input\n"
    "  --output FILE.tok tokenizer file to write\n";

static const char* ENCODE_HELP =
    "usage: tokenizer encode --tokenizer FILE.tok --input FILE --output PREFIX\n"
    "                        [--val-fraction F]\n"
    "\n"
    "Splits the bytes of FILE: the first (1 - F) become PREFIX_train.bin and the\n"
    "last F become PREFIX_val.bin, and encodes each part. Token files use llm.c's\n"
    "layout (256 int32 header: 20240520, version, count; then uint16 tokens, or\n"
    "uint32 with version 2 above 65536 ids). Prints throughput on stderr.\n"
    "\n"
    "  --tokenizer FILE.tok  tokenizer to use\n"
    "  --input FILE          text to encode\n"
    "  --output PREFIX       output prefix\n"
    "  --val-fraction F      share of the text for validation, 0 <= F < 1\n"
    "                        (default 0.1; with 0 the val file holds no tokens)\n";

static const char* DECODE_HELP =
    "usage: tokenizer decode --tokenizer FILE.tok --input FILE.bin\n"
    "\n"
    "Writes the text of a token file to stdout, byte for byte. The end-of-text\n"
    "token decodes to the separator text \"<|endoftext|>\".\n"
    "\n"
    "  --tokenizer FILE.tok  tokenizer the file was encoded with\n"
    "  --input FILE.bin      token file\n";

// ----------------------------------------------------------------------------
// Flag parsing helpers. Each command walks its own arguments.

static void require(const char* command, const char* value, const char* flag) {
    if (!value)
        fail("%s: missing required flag %s (see 'tokenizer %s --help')", command, flag, command);
}

// ----------------------------------------------------------------------------
// tokenizer corpus

static bool ends_with(const std::string& text, const std::string& suffix) {
    return text.size() >= suffix.size() &&
           text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

static int command_corpus(int argc, char** argv) {
    const char* command = "corpus";
    if (wants_help(argc, argv)) {
        fputs(CORPUS_HELP, stdout);
        return 0;
    }
    const char* dir = nullptr;
    const char* output = nullptr;
    std::string ext = ".py";
    std::vector<std::string> skip_dirs;
    for (int i = 0; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "--dir") == 0) dir = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--output") == 0) output = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--ext") == 0) ext = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--skip-dir") == 0) skip_dirs.push_back(flag_value(argc, argv, &i));
        else unknown_flag(arg);
    }
    require(command, dir, "--dir");
    require(command, output, "--output");

    // Collect the paths first and sort them: directory listing order depends on
    // the filesystem, and the corpus must not.
    namespace fs = std::filesystem;
    std::error_code error;
    if (!fs::is_directory(dir, error)) fail("corpus: '%s' is not a directory", dir);
    std::vector<std::string> paths;
    fs::recursive_directory_iterator it(dir, fs::directory_options::skip_permission_denied, error);
    if (error) fail("corpus: cannot list '%s': %s", dir, error.message().c_str());
    for (; it != fs::recursive_directory_iterator(); it.increment(error)) {
        if (error) fail("corpus: cannot list '%s': %s", dir, error.message().c_str());
        std::string name = it->path().filename().string();
        if (it->is_directory(error)) {
            if (std::find(skip_dirs.begin(), skip_dirs.end(), name) != skip_dirs.end())
                it.disable_recursion_pending();
            continue;
        }
        if (it->is_regular_file(error) && ends_with(name, ext))
            paths.push_back(it->path().string());
    }
    if (error) fail("corpus: cannot list '%s': %s", dir, error.message().c_str());
    std::sort(paths.begin(), paths.end());

    std::string corpus;
    int files = 0;
    int skipped = 0;
    for (const std::string& path : paths) {
        std::string text = read_whole_file(path.c_str(), "corpus input");
        if (text.find(end_of_text_name) != std::string::npos) {
            fprintf(stderr, "corpus: warning: skipping '%s': it contains the separator %s\n",
                    path.c_str(), end_of_text_name);
            skipped++;
            continue;
        }
        if (files > 0) corpus += end_of_text_name;
        corpus += text;
        files++;
    }
    if (files == 0) fail("corpus: no files ending in '%s' under '%s'", ext.c_str(), dir);
    write_file_atomic(output, corpus.data(), corpus.size(), "corpus file");
    fprintf(stderr, "corpus: %d files (%d skipped), %.1f MB -> %s\n", files, skipped,
            corpus.size() / 1e6, output);
    return 0;
}

// ----------------------------------------------------------------------------
// tokenizer train

static int command_train(int argc, char** argv) {
    const char* command = "train";
    if (wants_help(argc, argv)) {
        fputs(TRAIN_HELP, stdout);
        return 0;
    }
    const char* input = nullptr;
    const char* output = nullptr;
    int vocab_size = 0;
    bool bytes_only = false;
    for (int i = 0; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "--input") == 0) input = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--output") == 0) output = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--vocab-size") == 0)
            vocab_size = parse_int(arg, flag_value(argc, argv, &i), 257, 1 << 30);
        else if (strcmp(arg, "--bytes") == 0) bytes_only = true;
        else unknown_flag(arg);
    }
    require(command, output, "--output");
    if (bytes_only && vocab_size != 0)
        fail("train: --bytes and --vocab-size cannot be used together");
    if (!bytes_only) {
        require(command, input, "--input");
        if (vocab_size == 0) fail("train: missing required flag --vocab-size (or --bytes)");
    }

    std::string text = input ? read_whole_file(input, "training text") : std::string();
    Tokenizer tok;
    double start = seconds_now();
    tokenizer_train(&tok, text.data(), text.size(), bytes_only ? 257 : vocab_size);
    double seconds = seconds_now() - start;
    tokenizer_save(&tok, output);

    size_t merges = tok.merges.size();
    fprintf(stderr, "train: %.2f MB, %zu merges in %.2f s (%.0f merges/s), vocab size %d -> %s\n",
            text.size() / 1e6, merges, seconds, merges / (seconds > 0 ? seconds : 1e-9),
            tok.vocab_size, output);
    if (!bytes_only && tok.vocab_size < vocab_size)
        fprintf(stderr, "train: note: the text ran out of pairs; vocab size is %d, not %d\n",
                tok.vocab_size, vocab_size);
    return 0;
}

// ----------------------------------------------------------------------------
// tokenizer encode

static int command_encode(int argc, char** argv) {
    const char* command = "encode";
    if (wants_help(argc, argv)) {
        fputs(ENCODE_HELP, stdout);
        return 0;
    }
    const char* tokenizer_path = nullptr;
    const char* input = nullptr;
    const char* prefix = nullptr;
    double val_fraction = 0.1;
    for (int i = 0; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "--tokenizer") == 0) tokenizer_path = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--input") == 0) input = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--output") == 0) prefix = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--val-fraction") == 0)
            val_fraction = parse_number(arg, flag_value(argc, argv, &i), 0, 0.999);
        else unknown_flag(arg);
    }
    require(command, tokenizer_path, "--tokenizer");
    require(command, input, "--input");
    require(command, prefix, "--output");

    Tokenizer tok;
    tokenizer_load(&tok, tokenizer_path);
    std::string text = read_whole_file(input, "input text");
    // Split the raw bytes like nanoGPT: the first (1 - F) for training, the rest for validation.
    size_t split = (size_t)((double)text.size() * (1.0 - val_fraction));
    if (split > text.size()) split = text.size();

    const char* names[2] = {"train", "val"};
    size_t begins[2] = {0, split};
    size_t ends[2] = {split, text.size()};
    for (int part = 0; part < 2; part++) {
        size_t bytes = ends[part] - begins[part];
        std::vector<int32_t> tokens;
        tokens.reserve(bytes / 3 + 16);
        double start = seconds_now();
        tokenizer_encode(&tok, text.data() + begins[part], bytes, &tokens);
        double seconds = seconds_now() - start;
        std::string path = std::string(prefix) + "_" + names[part] + ".bin";
        write_token_file(path.c_str(), tokens.data(), tokens.size(), tok.vocab_size,
                         tokenizer_fingerprint(&tok));
        fprintf(
            stderr,
            "encode: %-5s %.2f MB -> %zu tokens (%.2f bytes/token) in %.2f s (%.1f MB/s) -> %s\n",
            names[part], bytes / 1e6, tokens.size(),
            tokens.empty() ? 0.0 : (double)bytes / tokens.size(), seconds,
            bytes / 1e6 / (seconds > 0 ? seconds : 1e-9), path.c_str());
    }
    return 0;
}

// ----------------------------------------------------------------------------
// tokenizer decode

static int command_decode(int argc, char** argv) {
    const char* command = "decode";
    if (wants_help(argc, argv)) {
        fputs(DECODE_HELP, stdout);
        return 0;
    }
    const char* tokenizer_path = nullptr;
    const char* input = nullptr;
    for (int i = 0; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "--tokenizer") == 0) tokenizer_path = flag_value(argc, argv, &i);
        else if (strcmp(arg, "--input") == 0) input = flag_value(argc, argv, &i);
        else unknown_flag(arg);
    }
    require(command, tokenizer_path, "--tokenizer");
    require(command, input, "--input");

    Tokenizer tok;
    tokenizer_load(&tok, tokenizer_path);
    std::string quoted = std::string("'").append(tokenizer_path).append("'");
    std::vector<int32_t> tokens =
        read_token_file(input, tok.vocab_size, tokenizer_fingerprint(&tok), quoted.c_str());
    std::string text;
    tokenizer_decode(&tok, tokens.data(), tokens.size(), &text);
    if (fwrite(text.data(), 1, text.size(), stdout) != text.size() || fflush(stdout) != 0)
        fail("decode: cannot write to stdout: %s", strerror(errno));
    return 0;
}

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        fputs(MAIN_HELP, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    const char* command = argv[1];
    // The command's own arguments start after the command name.
    int rest_count = argc - 2;
    char** rest = argv + 2;
    try {
        if (strcmp(command, "corpus") == 0) return command_corpus(rest_count, rest);
        if (strcmp(command, "train") == 0) return command_train(rest_count, rest);
        if (strcmp(command, "encode") == 0) return command_encode(rest_count, rest);
        if (strcmp(command, "decode") == 0) return command_decode(rest_count, rest);
        fail(
            "unknown command '%s' (commands: corpus, train, encode, decode; see 'tokenizer "
            "--help')",
            command);
    } catch (const std::exception& error) {
        fprintf(stderr, "tokenizer: error: %s\n", error.what());
        return 1;
    }
}
