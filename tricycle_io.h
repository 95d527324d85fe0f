// tricycle_io.h — Part II of the library: what surrounds the core (tricycle.h) — profiling reports,
// model and checkpoint files, the tokenizer, token files and the data loader, and helpers for the
// programs. tricycle.h includes it, so a program includes tricycle.h alone.
#pragma once

#include "tricycle.h"

// ====================================================================================================
// 1. Profiling reports

void profile_reset();
void profile_report(FILE* out, long steps);  // a table of time per step by name, slowest first

// ====================================================================================================
// 2. Files. `kind` names the file in error messages, e.g. "token file". Every file a program reads
// is treated as hostile: each size read from it is checked against caps and against what the file
// still holds before anything is allocated or multiplied by it.

// The whole file; more than max_bytes is an error, not an allocation.
std::string read_whole_file(const char* path, const char* kind, size_t max_bytes = size_t(1) << 34);

// Reads a file image held in memory; every read is checked against what is left.
struct ByteReader {
    const std::string& data;
    size_t position;
    const char* kind;
    const char* path;
    size_t remaining() const { return data.size() - position; }
    void read(void* out, size_t bytes, const char* what);
};

// CRC-32, as zlib.crc32 computes it (Python: zlib.crc32(data)); `crc` continues an earlier one.
uint32_t crc32(const void* data, size_t bytes, uint32_t crc = 0);

// Writes to "<path>.tmp.<pid>" and renames it over `path`: readers see the old file or the complete
// new one, never a partial write, and two processes never share a temporary file.
void write_file_atomic(const char* path, const void* data, size_t size, const char* kind);
// Removes the "<path>.tmp.<pid>" files that writers killed before their rename left behind. Only
// for a caller that knows no writer of `path` is alive (one holding the folder's lock).
void remove_temporary_copies(const char* path);

// Takes an exclusive lock on FOLDER/.lock for the rest of the process, or fails at once naming the
// folder when another process holds it (flock: released when the process ends, even by a crash).
void lock_folder(const char* folder, const char* program);

// ====================================================================================================
// 3. Model files (version 2). Little-endian:
//   header      256 int32: [0] magic 0x59435254 ("TRCY"), [1] version 2, [2] vocab_size,
//               [3] context, [4] dim, [5] layers, [6] heads, [7] mlp_ratio, [8] norm (0 layernorm,
//               1 rmsnorm), [9] activation (0 gelu, 1 swiglu), [10] rotary (0/1), [11] tied (0/1),
//               [12] dropout and [13] attention_dropout (float32 bits), [14] number of tensors,
//               [15] number of sections, [16..17] number of parameters (int64), [18] CRC-32 of the
//               directory, [19] CRC-32 of the parameters, [20] CRC-32 of the header itself (taken
//               with [20] = 0); [21..255] zero
//   directory   per tensor, in buffer order: name (48 bytes, NUL-padded), then int32 ndim, dims[0],
//               dims[1], 0
//   parameters  float32, in buffer order
//   sections    each: tag (4 bytes), length (int64), CRC-32 of the payload (uint32), payload; a tag
//               at most once
// Loading checks every field, checksum and length, and that the parameters are finite, before it
// allocates the model. Written to a temporary file and renamed into place.

struct FileSection {
    char tag[4];
    std::string bytes;
};
void gpt_save(GPT& model, const char* path, const std::vector<FileSection>& sections = {});
// Creates the model from the file; the sections come back when asked for. A file is read whole;
// bigger than model_file_max_bytes it is refused unread. A checkpoint holds about 16 bytes a
// parameter (float32 parameters, AdamW's two moments and, in the bfloat16 build, the master copy):
// GPT-2 1.5B's is 25 GB, so the cap guards against a wrong file, not against real models.
constexpr size_t model_file_max_bytes = size_t(1) << 38;
void gpt_load(GPT* model, const char* path, std::vector<FileSection>* sections = nullptr);
// Optimizer moments and master weights are stored like the parameters: in their order and count
// (gpt_parameter_count, the real vocabulary). A host buffer in the model's parameter order
// (padding included) -> a section's float32 bytes, and back (exactly that many finite values).
std::string parameters_section(const GPTConfig& config, const std::vector<real>& buffer);
std::vector<real> parameters_from_section(const GPTConfig& config, const FileSection& section,
                                          const char* path);

// ====================================================================================================
// 4-6. The tokenizer, token files and the data loader (host code)
//
// Three pieces, used in this order by a training run:
//
//   1. Tokenizer  - turns bytes into token ids and back. The 256 byte values are
//                   the base vocabulary, so every byte string can be encoded.
//                   Training learns "merges": merge i says "the adjacent pair
//                   (left, right) becomes the new token 256 + i". The last id is
//                   the end-of-text token.
//   2. Token file - an encoded text on disk (llm.c's shard layout), written once
//                   by `tokenizer encode` and read by the loader.
//   3. DataLoader - cuts (B, T) windows of inputs and next-token targets out of
//                   a token file: random windows for training, an in-order sweep
//                   for validation.
//
// All files are little-endian (big-endian hosts are not supported).
//
// Tokenizer file (.tok), all integers int32:
//   magic = tokenizer_magic, version (1 or 2), vocab_size, num_merges, num_special
//   version 2 only: pretokenizer (0 tricycle, 1 gpt2)
//   num_merges x (left, right)            merge i defines token 256 + i
//   num_special x (id, name_length, name bytes)
//   version 2 only: vocab_size ids, the id of each token in the order bytes 0..255,
//   merges 0..M-1, end-of-text (a permutation of 0..vocab_size-1)
// Exactly one special token, the end-of-text token: in version 1 its id is
// vocab_size - 1 = 256 + num_merges, in version 2 the table's last entry. In
// version 1 token t's id is t and the pretokenizer is tricycle's. Merges name
// tokens by their place in that order (byte b is b, merge i is 256 + i), in
// both versions. Nothing may follow the last field. Tokenizers trained here
// are written as version 1; imported GPT-2 vocabularies (tools/import_hf.py) as
// version 2.
//
// Token file (.bin): 256 int32 header (magic 20240520, version, token count,
// the tokenizer's fingerprint or 0, the rest zero), then the tokens: uint16 for
// version 1, uint32 for version 2 (used when the vocabulary has more than 65536
// ids). llm.c's shard layout; llm.c leaves field [3] zero.

// ----------------------------------------------------------------------------------------------------
// 4. The tokenizer

constexpr uint32_t tokenizer_magic = 0x4B544354;  // the bytes "TCTK" read as a little-endian int
constexpr int tokenizer_version = 1;              // tricycle chunks, ids in merge order
constexpr int tokenizer_version_ids = 2;          // a pretokenizer field and an id table
constexpr int byte_tokens = 256;                  // ids 0..255 are the raw byte values
constexpr int max_token_bytes = 1 << 16;  // no token decodes to more (decoding stays bounded)
// The end-of-text token's name. It is also its text: the corpus builder puts this
// string between files, encoding turns each occurrence into the end-of-text token
// and decoding turns the token back into the string, so decode(encode(x)) == x
// for every byte string x.
constexpr const char* end_of_text_name = "<|endoftext|>";

struct TokenPair {
    int32_t left;
    int32_t right;
};

// How text is cut into chunks before BPE (merges never cross a chunk).
enum class Pretokenizer : int32_t {
    tricycle = 0,  // tokenizer_chunk_length
    gpt2 = 1,      // GPT-2's pattern, tokenizer_gpt2_chunk_length
};

// Where a cached chunk encoding lives inside Tokenizer::cache_tokens.
struct CachedChunk {
    uint32_t offset;
    uint32_t count;
};

// One entry of the encoder's priority queue: "the pair starting at `position`
// has merge rank `rank`".
struct MergeCandidate {
    int32_t rank;
    int32_t position;
};

struct Tokenizer {
    int vocab_size = 0;             // 256 + merges.size() + 1
    std::vector<TokenPair> merges;  // merges[i] creates token 256 + i
    int eot_token = -1;             // end-of-text id (vocab_size - 1 unless `ids` says otherwise)
    std::string eot_name;           // end_of_text_name
    Pretokenizer pretokenizer = Pretokenizer::tricycle;
    // A token's place in merge order (bytes 0..255, merge i at 256 + i, end-of-text last) is its
    // "slot"; merges, tables and the encoder work with slots. Imported vocabularies number their
    // tokens otherwise: id_of_slot maps a slot to the id that encode returns and decode takes, and
    // slot_of_id back. Both empty: a token's id is its slot.
    std::vector<int32_t> id_of_slot, slot_of_id;

    // Derived tables, rebuilt from the merges by train and load.
    std::string token_bytes;          // all tokens' bytes, back to back
    std::vector<size_t> token_start;  // token id's bytes begin here; vocab_size + 1 entries
    std::unordered_map<uint64_t, int32_t> merge_rank;  // pair key -> merge index

    // Encoder state. Real text repeats the same chunks ("the", " return", "    ")
    // over and over, so each distinct chunk is encoded once and remembered.
    std::unordered_map<std::string_view, CachedChunk> cache;  // views into cache_keys
    std::deque<std::string> cache_keys;                       // deque: elements never move
    std::vector<int32_t> cache_tokens;
    // Scratch buffers of the chunk encoder, kept to avoid reallocating.
    std::vector<int32_t> work_ids, work_next, work_prev;
    std::vector<MergeCandidate> work_heap;

    Tokenizer() = default;
    Tokenizer(const Tokenizer&) = delete;  // the cache holds views into itself
    Tokenizer& operator=(const Tokenizer&) = delete;
};

// Length of the chunk that starts at text[0] (length > 0). Text is cut into
// chunks before BPE so that merges never cross a chunk boundary:
//   - a run of letters (bytes >= 0x80 count as letters, so UTF-8 stays whole),
//   - a run of digits,
//   - a run of other bytes (punctuation, control bytes, NUL),
//   each optionally with one leading ' ' (so " the" is one chunk),
//   - a run of whitespace; if a run of two or more ends in ' ' right before a
//     non-whitespace byte, that last ' ' is left to start the next chunk.
size_t tokenizer_chunk_length(const char* text, size_t length);
// The same for GPT-2's pre-tokenizer pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// over UTF-8 (classes from unicode_classes.h). A byte that does not start a valid UTF-8 sequence
// is one character of its own, neither letter, number nor space.
size_t tokenizer_gpt2_chunk_length(const char* text, size_t length);

// Learn merges from `text` until the vocabulary (256 bytes + merges + end-of-text)
// has `vocab_size` ids, or until no adjacent pair is left (then it is smaller).
// Ties in pair frequency go to the smallest (left, right).
// vocab_size == 257 gives the plain byte tokenizer (no merges).
void tokenizer_train(Tokenizer* tok, const char* text, size_t length, int vocab_size);
void tokenizer_save(const Tokenizer* tok, const char* path);
void tokenizer_load(Tokenizer* tok, const char* path);  // validates everything
// The file's bytes, and back (a checkpoint carries its tokenizer this way); `path` names it in
// errors.
std::string tokenizer_serialize(const Tokenizer* tok);
// CRC-32 of the tokenizer's file bytes, never 0: token files and checkpoints record it, so that
// files made with different tokenizers are not mixed.
uint32_t tokenizer_fingerprint(const Tokenizer* tok);
void tokenizer_parse(Tokenizer* tok, const std::string& data, const char* path);

// Appends the tokens of `text` to *tokens. Not thread-safe (uses the cache).
void tokenizer_encode(Tokenizer* tok, const char* text, size_t length,
                      std::vector<int32_t>* tokens);
// Appends the bytes of `tokens` to *text. Fails on ids outside the vocabulary.
void tokenizer_decode(const Tokenizer* tok, const int32_t* tokens, size_t count, std::string* text);
// The bytes of one token (for streaming output while sampling).
std::string_view tokenizer_token_bytes(const Tokenizer* tok, int token);

// ====================================================================================================
// 5. Token files

constexpr int token_file_magic = 20240520;
constexpr int token_file_version_u16 = 1;  // tokens stored as uint16
constexpr int token_file_version_u32 = 2;  // tokens stored as uint32
constexpr int token_file_header_ints = 256;

// Writes `tokens` (each in [0, vocab_size)) to `path` via a temporary file and a rename, so a
// reader never sees a half-written file: uint16 when vocab_size <= 65536. Header field [3] records
// the fingerprint of the tokenizer the tokens come from (0: not known).
void write_token_file(const char* path, const int32_t* tokens, size_t count, int vocab_size,
                      uint32_t tokenizer_fingerprint);

// An open, validated token file. Tokens are read with pread, so a file that shrinks while it is in
// use ends in an error, not a crash.
struct TokenFile {
    std::string path;
    int fd = -1;
    int version = 0;  // token_file_version_u16 or _u32
    int vocab_size = 0;
    size_t num_tokens = 0;
    uint32_t tokenizer_fingerprint = 0;  // header field [3]

    TokenFile() = default;
    TokenFile(const TokenFile&) = delete;
    TokenFile& operator=(const TokenFile&) = delete;
    ~TokenFile();
};

// Opens `path` and checks the header (reserved fields zero), that the size matches the count, and
// that every token is < vocab_size. Given the `fingerprint` of the tokenizer the tokens must come
// from (named `tokenizer_name` in the message), a file that records another one fails first, so
// that another tokenizer's file is called that, not a file of out-of-range tokens. A file that
// records none (0, as llm.c's files) passes.
void token_file_open(TokenFile* file, const char* path, int vocab_size, uint32_t fingerprint = 0,
                     const char* tokenizer_name = nullptr);
void token_file_read(const TokenFile* file, size_t first, size_t count, int32_t* out);
// Convenience: open (as token_file_open) and read all tokens.
std::vector<int32_t> read_token_file(const char* path, int vocab_size, uint32_t fingerprint = 0,
                                     const char* tokenizer_name = nullptr);

// ====================================================================================================
// 6. The data loader

enum class DataLoaderMode {
    random,  // training: each row is a window at a random position
    sweep,   // validation: consecutive non-overlapping windows, in order, wrapping
};

struct DataLoader {
    TokenFile file;
    int B = 0;  // rows per batch
    int T = 0;  // tokens per row
    DataLoaderMode mode = DataLoaderMode::random;
    uint64_t seed = 0;
    uint64_t rng_state = 0;        // random mode: splitmix64 state
    size_t sweep_next = 0;         // sweep mode: where the next window starts
    size_t sweep_windows = 0;      // windows in one full pass: (num_tokens - 1) / T
    std::vector<int32_t> inputs;   // (B, T) row-major: the window's tokens 0..T-1
    std::vector<int32_t> targets;  // (B, T): tokens 1..T, i.e. inputs shifted by one
    std::vector<int32_t> window;   // T + 1 tokens read at once
};

// Opens and validates `path` (as token_file_open); the file must hold at least T + 1 tokens.
void dataloader_open(DataLoader* loader, const char* path, int B, int T, int vocab_size,
                     DataLoaderMode mode, uint64_t seed, uint32_t fingerprint = 0,
                     const char* tokenizer_name = nullptr);
// Fills loader->inputs and loader->targets with the next batch.
void dataloader_next_batch(DataLoader* loader);
// Back to the state right after open: the sweep restarts at token 0, the RNG at the seed.
void dataloader_reset(DataLoader* loader);
// Sweep mode: the next batch is the sweep's batch number `batch` counted from the start (wrapping
// as the sweep does), so that ranks can each evaluate their share of the batches.
void dataloader_seek_batch(DataLoader* loader, size_t batch);
// Save / restore the random-window stream, to resume a training run exactly.
uint64_t dataloader_get_rng_state(const DataLoader* loader);
void dataloader_set_rng_state(DataLoader* loader, uint64_t state);

// ====================================================================================================
// 7. Command-line programs: flag parsing shared by train_gpt, inference and tokenizer, so every bad
// flag gets the same kind of one-line error (the program's main adds its name in front).

bool wants_help(int argc, char** argv);                 // any --help or -h
const char* flag_value(int argc, char** argv, int* i);  // the value after the flag argv[*i]
long parse_int(const char* flag, const char* text, long min, long max);
double parse_number(const char* flag, const char* text, double min, double max);
[[noreturn]] void unknown_flag(const char* arg);
double seconds_now();  // a steady clock

// A program's main: --help prints `help`; otherwise it runs body(argc, argv), and an error becomes
// one line "NAME: error: MESSAGE" on stderr and exit status 1.
int run_program(const char* name, const char* help, int argc, char** argv,
                int (*body)(int argc, char** argv));
