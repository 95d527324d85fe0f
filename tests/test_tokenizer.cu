// test_tokenizer.cu - checks for the tokenizer, token files and data loader.
//
// usage: test_tokenizer [CORPUS]
// CORPUS is a large text file for the corpus checks, by default
// data/python_corpus.txt (made by `tokenizer corpus`). When it does not exist
// those checks are skipped with a note, and not counted.
//
// Each check prints "ok   <what>" or "FAIL <what>: <details>"; the last line is
// "N passed, M failed" and the exit status is non-zero if anything failed.
#include "tricycle.h"
#include "check.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

// check() from check.h, with details appended when the check fails.
static void check_that(bool ok, const std::string& what, const std::string& details = "") {
    check(ok, "%s%s%s", what.c_str(), ok || details.empty() ? "" : ": ", ok ? "" : details.c_str());
}

// Expects `action` to throw, with a message that contains every string in `needles`
// (typically the file's path and what is wrong with it).
template <typename Action>
static void check_rejects(const std::string& what, const std::vector<std::string>& needles,
                          Action action) {
    try {
        action();
    } catch (const std::exception& error) {
        std::string message = error.what();
        for (const std::string& needle : needles) {
            if (message.find(needle) == std::string::npos) {
                check_that(false, what,
                           "message \"" + message + "\" does not mention \"" + needle + "\"");
                return;
            }
        }
        check_that(true, what + ": rejected with \"" + message + "\"");
        return;
    }
    check_that(false, what, "was accepted");
}

// ----------------------------------------------------------------------------
// Helpers

static std::string temp_dir;

static std::string temp_path(const std::string& name) { return temp_dir + "/" + name; }

static void write_bytes(const std::string& path, const std::string& data) {
    FILE* f = fopen(path.c_str(), "wb");
    if (!f || fwrite(data.data(), 1, data.size(), f) != data.size()) {
        fprintf(stderr, "cannot write %s\n", path.c_str());
        exit(2);
    }
    fclose(f);
}

static std::vector<int32_t> encode(Tokenizer* tok, const std::string& text) {
    std::vector<int32_t> tokens;
    tokenizer_encode(tok, text.data(), text.size(), &tokens);
    return tokens;
}

static std::string decode(const Tokenizer* tok, const std::vector<int32_t>& tokens) {
    std::string text;
    tokenizer_decode(tok, tokens.data(), tokens.size(), &text);
    return text;
}

static void train(Tokenizer* tok, const std::string& text, int vocab_size) {
    tokenizer_train(tok, text.data(), text.size(), vocab_size);
}

static std::string merges_to_string(const std::vector<TokenPair>& merges) {
    std::string s;
    for (const TokenPair& m : merges)
        s.append("(")
            .append(std::to_string(m.left))
            .append(",")
            .append(std::to_string(m.right))
            .append(")");
    return s;
}

// "" if equal, else where the two merge lists first differ.
static std::string merge_difference(const std::vector<TokenPair>& x,
                                    const std::vector<TokenPair>& y) {
    for (size_t i = 0; i < x.size() && i < y.size(); i++)
        if (x[i].left != y[i].left || x[i].right != y[i].right)
            return "merge " + std::to_string(i) + " is " + merges_to_string({x[i]}) +
                   ", expected " + merges_to_string({y[i]});
    if (x.size() != y.size())
        return std::to_string(x.size()) + " merges, expected " + std::to_string(y.size());
    return "";
}

static bool same_merges(const std::vector<TokenPair>& x, const std::vector<TokenPair>& y) {
    if (x.size() != y.size()) return false;
    for (size_t i = 0; i < x.size(); i++)
        if (x[i].left != y[i].left || x[i].right != y[i].right) return false;
    return true;
}

static std::string random_bytes(uint64_t* rng, size_t n) {
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i++) s[i] = (char)(splitmix64_next(rng) & 0xFF);
    return s;
}

// Text that looks a little like prose and code: words from a small list,
// numbers, punctuation, indentation, some UTF-8, now and then a document
// separator. Deterministic.
static std::string generated_text(uint64_t seed, size_t target_bytes) {
    const char* words[] = {"the",  "of",   "and",  "self",  "return", "def",   "value",
                           "x",    "thee", "thou", "café",  "naïve",  "print", "import",
                           "data", "for",  "in",   "range", "Hello",  "aaaa"};
    const char* separators[] = {" ", " ",  " ",   ", ", ".\n", "\n    ",
                                "(", ") ", " = ", "  ", "\t",  ": "};
    uint64_t rng = seed;
    std::string text;
    while (text.size() < target_bytes) {
        uint64_t r = splitmix64_next(&rng);
        if (r % 101 == 0) text += end_of_text_name;
        else if (r % 10 == 0) text += std::to_string(r % 2000);
        else text += words[(r >> 8) % 20];
        text += separators[(r >> 16) % 12];
    }
    return text;
}

// The pieces of text between end-of-text separators.
static std::vector<std::string> split_at_separators(const std::string& text) {
    std::vector<std::string> pieces;
    std::string separator = end_of_text_name;
    size_t start = 0;
    while (true) {
        size_t hit = text.find(separator, start);
        if (hit == std::string::npos) break;
        pieces.push_back(text.substr(start, hit - start));
        start = hit + separator.size();
    }
    pieces.push_back(text.substr(start));
    return pieces;
}

static std::vector<std::string> chunks_of(const std::string& text) {
    std::vector<std::string> chunks;
    size_t pos = 0;
    while (pos < text.size()) {
        size_t n = tokenizer_chunk_length(text.data() + pos, text.size() - pos);
        if (n == 0) break;  // would loop forever; the partition check catches it
        chunks.push_back(text.substr(pos, n));
        pos += n;
    }
    return chunks;
}

// ----------------------------------------------------------------------------
// Reference implementations: slow and simple, to compare the fast ones with.

// BPE training with a full recount of all pairs before every merge.
static std::vector<TokenPair> naive_train(const std::string& text, int vocab_size) {
    std::map<std::string, long long> chunk_counts;
    for (const std::string& piece : split_at_separators(text))
        for (const std::string& chunk : chunks_of(piece)) chunk_counts[chunk]++;
    std::vector<std::vector<int>> words;
    std::vector<long long> counts;
    for (const auto& entry : chunk_counts) {
        words.push_back(std::vector<int>(entry.first.begin(), entry.first.end()));
        for (int& symbol : words.back()) symbol &= 0xFF;  // char may be signed
        counts.push_back(entry.second);
    }
    std::vector<TokenPair> merges;
    while (256 + (int)merges.size() + 1 < vocab_size) {
        std::map<std::pair<int, int>, long long> pair_counts;
        for (size_t w = 0; w < words.size(); w++)
            for (size_t i = 0; i + 1 < words[w].size(); i++)
                pair_counts[{words[w][i], words[w][i + 1]}] += counts[w];
        if (pair_counts.empty()) break;
        // std::map iterates in (left, right) order, so the first maximum is the tie winner.
        std::pair<int, int> best = pair_counts.begin()->first;
        long long best_count = 0;
        for (const auto& entry : pair_counts)
            if (entry.second > best_count) {
                best = entry.first;
                best_count = entry.second;
            }
        int new_id = 256 + (int)merges.size();
        merges.push_back(TokenPair{best.first, best.second});
        for (std::vector<int>& word : words) {
            std::vector<int> merged;
            for (size_t i = 0; i < word.size(); i++) {
                if (i + 1 < word.size() && word[i] == best.first && word[i + 1] == best.second) {
                    merged.push_back(new_id);
                    i++;
                } else {
                    merged.push_back(word[i]);
                }
            }
            word = merged;
        }
    }
    return merges;
}

// BPE encoding the textbook way: repeatedly find the adjacent pair with the
// lowest merge rank and merge all its occurrences, left to right.
static std::vector<int32_t> naive_encode(const Tokenizer* tok, const std::string& text) {
    std::map<std::pair<int, int>, int> rank;
    for (size_t r = 0; r < tok->merges.size(); r++)
        rank[{tok->merges[r].left, tok->merges[r].right}] = (int)r;
    std::vector<int32_t> out;
    std::vector<std::string> pieces = split_at_separators(text);
    for (size_t p = 0; p < pieces.size(); p++) {
        if (p > 0) out.push_back(tok->eot_token);
        for (const std::string& chunk : chunks_of(pieces[p])) {
            std::vector<int> ids;
            for (char c : chunk) ids.push_back((unsigned char)c);
            while (true) {
                int best_rank = INT_MAX;
                for (size_t i = 0; i + 1 < ids.size(); i++) {
                    auto it = rank.find({ids[i], ids[i + 1]});
                    if (it != rank.end() && it->second < best_rank) best_rank = it->second;
                }
                if (best_rank == INT_MAX) break;
                TokenPair m = tok->merges[best_rank];
                std::vector<int> merged;
                for (size_t i = 0; i < ids.size(); i++) {
                    if (i + 1 < ids.size() && ids[i] == m.left && ids[i + 1] == m.right) {
                        merged.push_back(256 + best_rank);
                        i++;
                    } else {
                        merged.push_back(ids[i]);
                    }
                }
                ids = merged;
            }
            out.insert(out.end(), ids.begin(), ids.end());
        }
    }
    return out;
}

// ----------------------------------------------------------------------------
// Tokenizer checks

static void test_chunking() {
    std::string text = "Hello world  foo\n\n    return x1 = 42;\t\tend na\xc3\xafve";
    std::vector<std::string> expected = {"Hello",   " world", " ",   " foo",         "\n\n   ",
                                         " return", " x",     "1",   " =",           " 42",
                                         ";",       "\t\t",   "end", " na\xc3\xafve"};
    std::vector<std::string> got = chunks_of(text);
    std::string shown;
    for (const std::string& c : got) shown += "[" + c + "]";
    check_that(got == expected, "chunker splits words, spaces, digits, punctuation as documented",
               shown);

    uint64_t rng = 7;
    std::string bytes = random_bytes(&rng, 5000);
    std::string joined;
    bool all_nonempty = true;
    for (const std::string& c : chunks_of(bytes)) {
        all_nonempty = all_nonempty && !c.empty();
        joined += c;
    }
    check_that(all_nonempty && joined == bytes,
               "chunks of random bytes are non-empty and partition the input");
}

static void test_hand_checked_merges() {
    // "aaabdaaabac" is one chunk (all letters). Pair counts include overlaps.
    //   pairs: aa 4, ab 2, bd 1, da 1, ba 1, ac 1  -> merge 0: (a,a)=(97,97) -> 256 "Z"
    //   ZabdZabac: Za 2, ab 2, bd 1, dZ 1, ba 1, ac 1; tie at 2, smallest pair
    //              (97,98) < (256,97)              -> merge 1: (97,98) -> 257 "Y"
    //   ZYdZYac:   ZY 2, Yd 1, dZ 1, Ya 1, ac 1    -> merge 2: (256,257) -> 258 "X"
    //   XdXac:     Xd, dX, Xa, ac all 1; smallest  -> merge 3: (97,99) -> 259
    //   X d X 259: (258,100) (100,258) (258,259)   -> merge 4: (100,258) -> 260
    //   X 260 259: (258,260) (260,259)             -> merge 5: (258,260) -> 261
    //   261 259                                    -> merge 6: (261,259) -> 262
    //   one symbol left: training stops, vocab = 256 + 7 + 1 = 264.
    Tokenizer tok;
    train(&tok, "aaabdaaabac", 300);
    std::vector<TokenPair> expected = {{97, 97},   {97, 98},   {256, 257}, {97, 99},
                                       {100, 258}, {258, 260}, {261, 259}};
    check_that(same_merges(tok.merges, expected) && tok.vocab_size == 264 && tok.eot_token == 263,
               "hand-checked merges of 'aaabdaaabac' (ties, overlaps, early stop)",
               merges_to_string(tok.merges) + " vocab " + std::to_string(tok.vocab_size));

    // "ab ab ab" is chunks "ab", " ab", " ab": (a,b) 3, (' ',a) 2 -> (97,98) -> 256;
    // then (' ',256) 2 -> (32,256) -> 257; nothing left. Were chunks ignored,
    // "Z Z Z" would also give (256,32) and more merges.
    Tokenizer tok2;
    train(&tok2, "ab ab ab", 1000);
    check_that(same_merges(tok2.merges, {{97, 98}, {32, 256}}),
               "hand-checked merges of 'ab ab ab' respect chunk boundaries",
               merges_to_string(tok2.merges));

    // The separator is not text: only the two "ab" chunks around it count.
    Tokenizer tok3;
    train(&tok3, std::string("ab") + end_of_text_name + "ab", 1000);
    check_that(same_merges(tok3.merges, {{97, 98}}), "training skips the end-of-text separator",
               merges_to_string(tok3.merges));
}

static void test_training(const std::string& sample) {
    Tokenizer a, b;
    train(&a, sample, 600);
    train(&b, sample, 600);
    check_that(same_merges(a.merges, b.merges),
               "training is deterministic (two runs, identical merges)");
    check_that(a.vocab_size == 600 && a.eot_token == 599 && a.merges.size() == 600 - 257,
               "trained vocab size is as requested, end-of-text is the last id",
               "vocab " + std::to_string(a.vocab_size) + " eot " + std::to_string(a.eot_token));

    std::vector<TokenPair> reference = naive_train(sample, 600);
    check_that(same_merges(a.merges, reference),
               "incremental training matches full-recount training",
               merge_difference(a.merges, reference));

    Tokenizer bytes_tok;
    train(&bytes_tok, sample, 257);
    std::vector<int32_t> tokens = encode(&bytes_tok, std::string("h\xc3\xa9\0!", 5));
    check_that(bytes_tok.vocab_size == 257 && bytes_tok.merges.empty() &&
                   tokens == std::vector<int32_t>({'h', 0xc3, 0xa9, 0, '!'}),
               "byte-level tokenizer (vocab 257) encodes one token per byte");

    check_rejects("vocab size below 257", {"256", "257"}, [&] { train(&a, sample, 256); });
}

static void test_encoding(const std::string& sample) {
    Tokenizer tok;
    train(&tok, sample, 600);
    std::vector<int32_t> fast = encode(&tok, sample);
    std::vector<int32_t> again = encode(&tok, sample);  // now from the chunk cache
    std::vector<int32_t> reference = naive_encode(&tok, sample);
    check_that(fast == reference,
               "encode applies merges by rank like the reference encoder (sample text)",
               std::to_string(fast.size()) + " vs " + std::to_string(reference.size()) + " tokens");
    check_that(again == fast, "encoding twice (chunk cache) gives the same tokens");

    // Text unlike the training text: long runs, odd bytes, many cache misses.
    uint64_t rng = 99;
    std::string mixed =
        random_bytes(&rng, 3000) + std::string(500, 'a') + " aaaa aaaaa" + sample.substr(0, 2000);
    check_that(encode(&tok, mixed) == naive_encode(&tok, mixed),
               "encode matches the reference encoder on random bytes and long runs");
    check_that(
        fast.size() < sample.size() / 2, "merges compress the sample text",
        std::to_string(sample.size()) + " bytes -> " + std::to_string(fast.size()) + " tokens");
}

static void test_round_trips(const std::string& sample) {
    Tokenizer tok;
    train(&tok, sample, 600);

    uint64_t rng = 12345;
    bool all_ok = true;
    std::string failure;
    for (int trial = 0; trial < 50 && all_ok; trial++) {
        std::string text = random_bytes(&rng, (size_t)(splitmix64_next(&rng) % 4000));
        if (decode(&tok, encode(&tok, text)) != text) {
            all_ok = false;
            failure = "trial " + std::to_string(trial);
        }
    }
    check_that(all_ok, "round trip of random bytes (50 strings, all 256 byte values)", failure);

    std::vector<int32_t> empty_tokens = encode(&tok, "");
    check_that(empty_tokens.empty() && decode(&tok, empty_tokens).empty(),
               "empty input encodes to no tokens and back");

    std::string invalid_utf8 = "\xff\xfe caf\xc3 \xc3\x28 \x80\x80\x80 \xed\xa0\x80 end\xf0\x9f";
    check_that(decode(&tok, encode(&tok, invalid_utf8)) == invalid_utf8,
               "round trip of invalid UTF-8");

    const char nul_text[] = "\0the\0\0 value\0 \0";
    std::string with_nuls(nul_text, sizeof(nul_text) - 1);  // 15 bytes, 5 of them NUL
    check_that(decode(&tok, encode(&tok, with_nuls)) == with_nuls,
               "round trip of text with NUL bytes");

    std::string eot = end_of_text_name;
    std::string with_separator = "first doc" + eot + "second" + eot + eot + "<|endoftext| almost";
    std::vector<int32_t> tokens = encode(&tok, with_separator);
    int eot_count = 0;
    for (int32_t t : tokens) eot_count += (t == tok.eot_token);
    check_that(eot_count == 3 && decode(&tok, tokens) == with_separator,
               "each separator becomes one end-of-text token, decodes back to its text",
               std::to_string(eot_count) + " end-of-text tokens");

    check_rejects("decode of an id outside the vocabulary", {"600", "index 1"}, [&] {
        decode(&tok, {5, 600});
    });
}

static void test_corpus(const char* path) {
    if (access(path, R_OK) != 0) {
        printf("skip corpus checks: cannot read '%s' (build it, or pass a text file as argv[1])\n",
               path);
        return;
    }
    std::string corpus = read_whole_file(path, "corpus");
    Tokenizer tok;
    train(&tok, corpus, 2048);
    std::vector<int32_t> tokens = encode(&tok, corpus);
    check_that(
        decode(&tok, tokens) == corpus,
        "round trip of the whole corpus '" + std::string(path) + "'",
        std::to_string(corpus.size()) + " bytes, " + std::to_string(tokens.size()) + " tokens");

    std::string excerpt = corpus.substr(0, 300000);
    Tokenizer small;
    train(&small, excerpt, 400);
    std::vector<TokenPair> reference = naive_train(excerpt, 400);
    check_that(same_merges(small.merges, reference),
               "incremental training matches full-recount training on 300 KB of the corpus",
               merge_difference(small.merges, reference));
    std::string middle = corpus.substr(corpus.size() / 2, 200000);
    check_that(encode(&tok, middle) == naive_encode(&tok, middle),
               "encode matches the reference encoder on the corpus");
}

// ----------------------------------------------------------------------------
// Tokenizer file checks

static void test_tokenizer_files(const std::string& sample) {
    Tokenizer tok;
    train(&tok, sample, 600);
    std::string path = temp_path("good.tok");
    tokenizer_save(&tok, path.c_str());
    Tokenizer loaded;
    tokenizer_load(&loaded, path.c_str());
    check_that(same_merges(tok.merges, loaded.merges) && loaded.vocab_size == tok.vocab_size &&
                   loaded.eot_name == end_of_text_name &&
                   encode(&loaded, sample) == encode(&tok, sample),
               "tokenizer save/load round trip (same merges, same encoding)");

    std::string good = read_whole_file(path.c_str(), "test");
    size_t expected_size = 20 + 8 * tok.merges.size() + 8 + strlen(end_of_text_name);
    check_that(good.size() == expected_size && good.compare(0, 4, "TCTK") == 0,
               "tokenizer file layout: 20-byte header, 8 bytes per merge, end-of-text entry",
               std::to_string(good.size()) + " bytes");

    // Each corrupt variant is written to its own file so the error must name it.
    auto rejects = [&](const std::string& name, const std::string& data,
                       const std::string& needle) {
        std::string bad_path = temp_path(name);
        write_bytes(bad_path, data);
        Tokenizer t;
        check_rejects("tokenizer file " + name, {bad_path, needle},
                      [&] { tokenizer_load(&t, bad_path.c_str()); });
    };
    std::string bad = good;
    bad[0] = 'X';
    rejects("bad-magic.tok", bad, "bad magic");
    bad = good;
    bad[4] = 7;
    rejects("bad-version.tok", bad, "version 7");
    rejects("truncated.tok", good.substr(0, good.size() / 2), "truncated");
    rejects("truncated-name.tok", good.substr(0, good.size() - 3), "truncated");
    rejects("trailing-garbage.tok", good + "xyz", "trailing");
    // Merge 0 may only use bytes 0..255; make it use token 300.
    bad = good;
    int32_t undefined = 300;
    memcpy(&bad[20], &undefined, 4);
    rejects("undefined-token.tok", bad, "not defined");
    // Merge 1 repeats merge 0.
    bad = good;
    memcpy(&bad[28], &good[20], 8);
    rejects("repeated-merge.tok", bad, "repeats merge 0");
    bad = good;
    int32_t wrong_vocab = 5000;
    memcpy(&bad[8], &wrong_vocab, 4);
    rejects("wrong-vocab.tok", bad, "vocab size 5000");
    Tokenizer t;
    std::string missing = temp_path("missing.tok");
    check_rejects("missing tokenizer file", {missing, "cannot open"},
                  [&] { tokenizer_load(&t, missing.c_str()); });
}

// ----------------------------------------------------------------------------
// Token file checks

static void test_token_files() {
    std::vector<int32_t> tokens = {0, 1, 500, 65535, 7, 42};
    std::string path = temp_path("small.bin");
    write_token_file(path.c_str(), tokens.data(), tokens.size(), 65536, 0);
    std::string raw = read_whole_file(path.c_str(), "test");
    int32_t header[256];
    memcpy(header, raw.data(), sizeof(header));
    bool rest_zero = true;
    for (int i = 3; i < 256; i++) rest_zero = rest_zero && header[i] == 0;
    uint16_t third;
    memcpy(&third, raw.data() + 1024 + 2 * 3, 2);
    check_that(
        header[0] == 20240520 && header[1] == 1 && header[2] == 6 && rest_zero &&
            raw.size() == 1024 + 2 * 6 && third == 65535,
        "uint16 token file: header magic 20240520, version 1, count, zeros, then uint16 tokens");
    check_that(read_token_file(path.c_str(), 65536) == tokens, "uint16 token file reads back");
    check_that(access((path + ".tmp").c_str(), F_OK) != 0,
               "writer leaves no temporary file behind");

    std::vector<int32_t> wide = {69999, 65536, 3};
    std::string wide_path = temp_path("wide.bin");
    write_token_file(wide_path.c_str(), wide.data(), wide.size(), 70000, 0);
    std::string wide_raw = read_whole_file(wide_path.c_str(), "test");
    memcpy(header, wide_raw.data(), sizeof(header));
    check_that(header[0] == 20240520 && header[1] == 2 && header[2] == 3 &&
                   wide_raw.size() == 1024 + 4 * 3 &&
                   read_token_file(wide_path.c_str(), 70000) == wide,
               "uint32 token file (vocab > 65536): version 2, reads back");

    std::vector<int32_t> too_big = {1, 2, 1024};
    std::string reject_path = temp_path("never-written.bin");
    check_rejects("writing a token >= vocab size", {reject_path, "1024", "index 2"}, [&] {
        write_token_file(reject_path.c_str(), too_big.data(), too_big.size(), 1024, 0);
    });

    auto rejects = [&](const std::string& name, const std::string& data, int vocab_size,
                       const std::vector<std::string>& needles) {
        std::string bad_path = temp_path(name);
        write_bytes(bad_path, data);
        std::vector<std::string> all = needles;
        all.push_back(bad_path);
        check_rejects("token file " + name, all,
                      [&] { read_token_file(bad_path.c_str(), vocab_size); });
    };
    std::string bad = raw;
    bad[0] = 1;
    rejects("bad-magic.bin", bad, 65536, {"bad magic"});
    bad = raw;
    bad[4] = 9;
    rejects("bad-version.bin", bad, 65536, {"version 9"});
    rejects("truncated.bin", raw.substr(0, raw.size() - 1), 65536, {"truncated"});
    rejects("header-only-part.bin", raw.substr(0, 100), 65536, {"truncated"});
    rejects("trailing.bin", raw + "zz", 65536, {"trailing"});
    rejects("token-too-big.bin", raw, 1024, {"token 65535 at index 3 >= vocab size 1024"});
}

// ----------------------------------------------------------------------------
// Data loader checks

// A token file whose token i is i, so a window's first input names its start.
static std::string counting_file(const std::string& name, int count) {
    std::vector<int32_t> tokens(count);
    for (int i = 0; i < count; i++) tokens[i] = i;
    std::string path = temp_path(name);
    write_token_file(path.c_str(), tokens.data(), tokens.size(), 65536, 0);
    return path;
}

static std::vector<int32_t> batches(DataLoader* loader, int n) {
    std::vector<int32_t> all;
    for (int i = 0; i < n; i++) {
        dataloader_next_batch(loader);
        all.insert(all.end(), loader->inputs.begin(), loader->inputs.end());
        all.insert(all.end(), loader->targets.begin(), loader->targets.end());
    }
    return all;
}

static void test_dataloader() {
    const int N = 1000, B = 4, T = 8;
    std::string path = counting_file("count.bin", N);

    DataLoader loader;
    dataloader_open(&loader, path.c_str(), B, T, 65536, DataLoaderMode::random, 42);
    bool shifted = true, in_range = true;
    for (int step = 0; step < 50; step++) {
        dataloader_next_batch(&loader);
        for (int b = 0; b < B; b++) {
            int start = loader.inputs[b * T];
            in_range = in_range && start >= 0 && start + T + 1 <= N;
            for (int t = 0; t < T; t++) {
                shifted = shifted && loader.inputs[b * T + t] == start + t &&
                          loader.targets[b * T + t] == start + t + 1;
                if (t + 1 < T)
                    shifted = shifted && loader.targets[b * T + t] == loader.inputs[b * T + t + 1];
            }
        }
    }
    check_that(shifted, "targets are inputs shifted by one and match the file at the window start");
    check_that(in_range, "random windows stay inside the file");

    DataLoader same, other;
    dataloader_open(&same, path.c_str(), B, T, 65536, DataLoaderMode::random, 42);
    dataloader_open(&other, path.c_str(), B, T, 65536, DataLoaderMode::random, 43);
    dataloader_reset(&loader);
    std::vector<int32_t> first = batches(&loader, 10);
    check_that(first == batches(&same, 10) && first != batches(&other, 10),
               "random windows are determined by the seed (and reset restarts them)");

    // Resume: save the RNG state after 3 batches, replay the next 2 elsewhere.
    dataloader_reset(&loader);
    batches(&loader, 3);
    uint64_t state = dataloader_get_rng_state(&loader);
    std::vector<int32_t> continued = batches(&loader, 2);
    DataLoader resumed;
    dataloader_open(&resumed, path.c_str(), B, T, 65536, DataLoaderMode::random, 1);
    dataloader_set_rng_state(&resumed, state);
    check_that(batches(&resumed, 2) == continued,
               "restoring the RNG state resumes the exact window stream");

    uint64_t rng = 0;
    check_that(splitmix64_next(&rng) == 0xE220A8397B1DCDAFull,
               "splitmix64 from state 0 gives its published first value");
}

static void test_dataloader_sweep_and_edges() {
    const int N = 1000, B = 4, T = 8;
    std::string path = counting_file("count.bin", N);
    // Sweep: (N - 1) / T = 124 windows at 0, 8, ..., 984, then back to 0.
    DataLoader sweep;
    dataloader_open(&sweep, path.c_str(), B, T, 65536, DataLoaderMode::sweep, 0);
    bool in_order = sweep.sweep_windows == 124;
    int expected_start = 0;
    for (int step = 0; step < 31; step++) {  // 31 batches x 4 rows = 124 windows
        dataloader_next_batch(&sweep);
        for (int b = 0; b < B; b++) {
            in_order = in_order && sweep.inputs[b * T] == expected_start &&
                       sweep.targets[b * T + T - 1] == expected_start + T;
            expected_start += T;
        }
    }
    dataloader_next_batch(&sweep);
    bool wrapped = sweep.inputs[0] == 0 && sweep.inputs[T] == T;
    check_that(
        in_order && wrapped,
        "validation sweep covers the file in order with non-overlapping windows, then wraps");
    dataloader_reset(&sweep);
    std::vector<int32_t> sweep_first = batches(&sweep, 5);
    DataLoader sweep2;
    dataloader_open(&sweep2, path.c_str(), B, T, 65536, DataLoaderMode::sweep, 777);
    check_that(sweep_first == batches(&sweep2, 5) && sweep_first[0] == 0,
               "validation sweep is deterministic and reset restarts it");

    std::string short_path = counting_file("short.bin", T);
    DataLoader short_loader;
    check_rejects("loader given a file shorter than T+1 tokens",
                  {short_path, "has 8 tokens", "T+1 = 9"}, [&] {
                      dataloader_open(&short_loader, short_path.c_str(), B, T, 65536,
                                      DataLoaderMode::random, 0);
                  });
    std::string exact_path = counting_file("exact.bin", T + 1);
    DataLoader exact;
    dataloader_open(&exact, exact_path.c_str(), 2, T, 65536, DataLoaderMode::random, 5);
    dataloader_next_batch(&exact);
    check_that(exact.inputs[0] == 0 && exact.inputs[T] == 0 && exact.targets[T - 1] == T,
               "a file of exactly T+1 tokens gives the one possible window");

    DataLoader small_vocab;
    check_rejects(
        "loader checks every token against the vocab size at open",
        {path, "token 500 at index 500 >= vocab size 500"},
        [&] { dataloader_open(&small_vocab, path.c_str(), B, T, 500, DataLoaderMode::random, 0); });
}

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    char pattern[] = "/tmp/test_tokenizer_XXXXXX";
    if (!mkdtemp(pattern)) {
        perror("mkdtemp");
        return 2;
    }
    temp_dir = pattern;

    std::string sample = generated_text(2024, 60000);
    try {
        test_chunking();
        test_hand_checked_merges();
        test_training(sample);
        test_encoding(sample);
        test_round_trips(sample);
        test_corpus(argc > 1 ? argv[1] : "data/python_corpus.txt");
        test_tokenizer_files(sample);
        test_token_files();
        test_dataloader();
        test_dataloader_sweep_and_edges();
    } catch (const std::exception& error) {
        check_that(false, "unexpected error", error.what());
    }

    std::filesystem::remove_all(temp_dir);
    return finish();
}
