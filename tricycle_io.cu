// tricycle_io.cu — Part II of the library: what surrounds the core (tricycle.cu). The same order as
// tricycle_io.h:
//   1. Profiling        timing kernels and products, the report
//   2. Files            whole-file reads, atomic writes
//   3. Model files      gpt_save, gpt_load, checkpoint sections
//   4. The tokenizer    chunking, training (BPE with incremental pair counts), saving, encoding
//   5. Token files      writing, memory-mapped reading
//   6. The data loader  random training windows, the validation sweep
//   7. Programs         flags, errors, run_program
#include "tricycle.h"
#include "unicode_classes.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

// ====================================================================================================
// 1. Profiling. Regions are recorded as they start and end; on a GPU their CUDA events are read
// only in profile_report, so timing never stalls the stream.

bool profiling = false;
const char* profile_phase = "forward";

struct ProfileTotal {
    std::string name;
    const char* phase;
    long calls = 0;
    double seconds = 0;
};

static std::vector<ProfileTotal> profile_totals;
#ifdef __CUDACC__
struct PendingRegion {
    int slot;
    cudaEvent_t start, stop;
};
static std::vector<PendingRegion> pending_regions;
static std::vector<cudaEvent_t> spare_events;
static cudaEvent_t profile_event() {
    cudaEvent_t event;
    if (spare_events.empty()) cuda_check(cudaEventCreate(&event));
    else event = spare_events.back(), spare_events.pop_back();
    return event;
}
#endif

static int profile_slot(const std::string& name) {
    for (size_t i = 0; i < profile_totals.size(); i++)
        if (profile_totals[i].name == name && !strcmp(profile_totals[i].phase, profile_phase))
            return int(i);
    profile_totals.push_back(ProfileTotal{name, profile_phase});
    return int(profile_totals.size()) - 1;
}

static std::string kernel_display_name(const void* kernel) {
    static std::unordered_map<const void*, std::string> names;
    auto known = names.find(kernel);
    if (known != names.end()) return known->second;
#ifdef __CUDACC__
    const char* raw = "?";
    cudaFuncGetName(&raw, kernel);
    std::string name = raw;
#else
    std::string name = emu::kernel_name(kernel);
#endif
    std::string shortened = name.substr(0, name.find('('));  // drop the parameter list
    return names[kernel] = shortened;
}

ProfileRegion::ProfileRegion(const void* kernel)
    : ProfileRegion(kernel_display_name(kernel).c_str()) {}

ProfileRegion::ProfileRegion(const char* name)
    : slot(profile_slot(name)), pending(-1), start(seconds_now()) {
#ifdef __CUDACC__
    pending = int(pending_regions.size());
    pending_regions.push_back({slot, profile_event(), profile_event()});
    cuda_check(cudaEventRecord(pending_regions.back().start));
#endif
}

ProfileRegion::~ProfileRegion() {
    profile_totals[slot].calls++;
#ifdef __CUDACC__
    (void)cudaEventRecord(pending_regions[pending].stop);
#else
    profile_totals[slot].seconds += seconds_now() - start;
#endif
}

void profile_reset() { profile_totals.clear(); }

void profile_report(FILE* out, long steps) {
#ifdef __CUDACC__
    cuda_check(cudaDeviceSynchronize());
    for (PendingRegion& r : pending_regions) {
        float ms = 0;
        cuda_check(cudaEventElapsedTime(&ms, r.start, r.stop));
        profile_totals[r.slot].seconds += ms / 1e3;
        spare_events.push_back(r.start), spare_events.push_back(r.stop);
    }
    pending_regions.clear();
#endif
    std::vector<ProfileTotal> rows = profile_totals;
    std::sort(rows.begin(), rows.end(),
              [](const ProfileTotal& a, const ProfileTotal& b) { return a.seconds > b.seconds; });
    double total = 0;
    for (const ProfileTotal& r : rows) total += r.seconds;
    fprintf(out, "%-44s %-9s %9s %11s %7s\n", "kernel or matrix product", "pass", "calls",
            "ms/step", "share");
    for (const ProfileTotal& r : rows)
        fprintf(out, "%-44s %-9s %9.1f %11.3f %6.1f%%\n", r.name.c_str(), r.phase,
                double(r.calls) / steps, r.seconds / steps * 1e3,
                100 * r.seconds / std::max(total, 1e-30));
    fprintf(out, "%-44s %-9s %9s %11.3f\n", "total", "", "", total / steps * 1e3);
}

// ====================================================================================================
// 2. Files: whole-file reads, a bounds-checked reader, checksums, atomic writes

// Opens a file to read, and what it is. The open does not wait: a FIFO nobody writes to would
// hang a blocking one. Reads then block as usual, and a FIFO without a writer reads as empty.
static int open_for_reading(const char* path, const char* kind, struct stat* info) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail("%s '%s': cannot open: %s", kind, path, strerror(errno));
    if (fstat(fd, info) != 0) fail("%s '%s': cannot stat: %s", kind, path, strerror(errno));
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0)
        fail("%s '%s': cannot make its reads blocking: %s", kind, path, strerror(errno));
    return fd;
}

std::string read_whole_file(const char* path, const char* kind, size_t max_bytes) {
    struct stat info;
    int fd = open_for_reading(path, kind, &info);  // pipes (/dev/stdin) are read to their end
    size_t size = S_ISREG(info.st_mode) ? size_t(info.st_size) : 0;  // 0: not known (a pipe)
    if (S_ISDIR(info.st_mode) || size > max_bytes) {
        close(fd);
        if (S_ISDIR(info.st_mode)) fail("%s '%s': is a folder, expected a file", kind, path);
        fail("%s '%s': %zu bytes, more than the %zu this program reads", kind, path, size,
             max_bytes);
    }
    std::string data;
    char buffer[1 << 16];
    ssize_t n;
    int read_error = 0;
    try {  // a file under the cap may still be more than this machine's memory
        data.reserve(size);
        while (data.size() <= max_bytes && (n = read(fd, buffer, sizeof(buffer))) != 0) {
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) {
                read_error = errno;
                break;
            }
            data.append(buffer, size_t(n));
        }
    } catch (const std::bad_alloc&) {
        close(fd);
        fail("%s '%s': not enough memory to read it (%zu bytes)", kind, path,
             std::max(size, data.size()));
    }
    close(fd);
    if (read_error) fail("%s '%s': read error: %s", kind, path, strerror(read_error));
    if (data.size() > max_bytes)
        fail("%s '%s': more than the %zu bytes this program reads", kind, path, max_bytes);
    return data;
}

void ByteReader::read(void* out, size_t bytes, const char* what) {
    if (remaining() < bytes)
        fail("%s '%s': truncated: %s needs %zu bytes at offset %zu, the file has %zu", kind, path,
             what, bytes, position, data.size());
    memcpy(out, data.data() + position, bytes);
    position += bytes;
}

// CRC-32 as zlib's crc32() computes it (the reflected polynomial 0xEDB88320), a byte at a time
// through a table of the 256 byte values.
uint32_t crc32(const void* data, size_t bytes, uint32_t crc) {
    static const std::vector<uint32_t> table = [] {
        std::vector<uint32_t> t(256);
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    const unsigned char* p = static_cast<const unsigned char*>(data);
    crc = ~crc;
    for (size_t i = 0; i < bytes; i++) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

// For the crash tests: TRICYCLE_CRASH_BEFORE_RENAME=SUFFIX:N kills the process on the N-th write of
// a file whose path ends in SUFFIX, after the temporary file is complete and before the rename.
static void crash_here_if_asked(const char* path) {
    static int writes_seen = 0;
    const char* spec = getenv("TRICYCLE_CRASH_BEFORE_RENAME");
    const char* colon = spec ? strrchr(spec, ':') : nullptr;
    if (!colon) return;
    std::string suffix(spec, colon), name(path);
    bool matches = name.size() >= suffix.size() &&
                   name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    if (matches && ++writes_seen == atoi(colon + 1)) {
        fprintf(stderr, "TRICYCLE_CRASH_BEFORE_RENAME: aborting before renaming '%s'\n", path);
        abort();
    }
}

// The temporary file is named after this process, so two writers never share one.
static std::string temporary_prefix(const char* path) { return std::string(path) + ".tmp."; }

void write_file_atomic(const char* path, const void* data, size_t size, const char* kind) {
    std::string temp_path = temporary_prefix(path) + std::to_string(getpid());
    FILE* f = fopen(temp_path.c_str(), "wb");
    if (!f) fail("%s '%s': cannot create '%s': %s", kind, path, temp_path.c_str(), strerror(errno));
    bool ok = fwrite(data, 1, size, f) == size;
    ok = fflush(f) == 0 && ok;
    ok = fsync(fileno(f)) == 0 && ok;  // on disk before the rename makes it the file
    if (fclose(f) != 0) ok = false;
    if (!ok) {
        int error = errno;
        remove(temp_path.c_str());
        fail("%s '%s': write failed: %s", kind, path, strerror(error));
    }
    crash_here_if_asked(path);
    if (rename(temp_path.c_str(), path) != 0) {
        int error = errno;
        remove(temp_path.c_str());
        fail("%s '%s': cannot rename '%s' into place: %s", kind, path, temp_path.c_str(),
             strerror(error));
    }
}

void remove_temporary_copies(const char* path) {
    std::string whole = path;
    size_t name_start = whole.rfind('/') + 1;  // 0 without a slash (npos + 1)
    std::string folder = name_start > 0 ? whole.substr(0, name_start - 1) : ".";
    std::string prefix = temporary_prefix(path + name_start);
    DIR* entries = opendir(folder.c_str());
    if (!entries) return;
    while (dirent* entry = readdir(entries)) {
        std::string name = entry->d_name;
        bool left_over = name.size() > prefix.size() &&
                         name.compare(0, prefix.size(), prefix) == 0 &&
                         name.find_first_not_of("0123456789", prefix.size()) == std::string::npos;
        if (left_over) remove((folder + "/" + name).c_str());
    }
    closedir(entries);
}

void lock_folder(const char* folder, const char* program) {
    std::string path = std::string(folder) + "/.lock";
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) fail("cannot create the lock file '%s': %s", path.c_str(), strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int error = errno;
        close(fd);
        if (error == EWOULDBLOCK)
            fail("the folder '%s' is in use by another %s run (locked: %s)", folder, program,
                 path.c_str());
        fail("cannot lock '%s': %s", path.c_str(), strerror(error));
    }
    // The descriptor stays open, and the lock held, until the process ends.
}

// ====================================================================================================
// 3. Model and checkpoint files (the format is described in tricycle_io.h and the README)

constexpr int32_t model_file_magic = 0x59435254;  // the bytes "TRCY"
constexpr int32_t model_file_version = 2;
constexpr int directory_name_bytes = 48;
constexpr int header_ints = 256;
enum HeaderField {
    magic_field = 0,
    version_field,
    tensors_field = 14,
    sections_field,
    count_field = 16,
    directory_crc_field = 18,
    parameters_crc_field,
    header_crc_field,
    first_reserved_field
};

static void append(std::string& out, const void* data, size_t bytes) {
    out.append(static_cast<const char*>(data), bytes);
}

std::string parameters_section(const GPTConfig& config, const std::vector<real>& buffer) {
    std::vector<float> values = gpt_file_order(config, buffer);
    std::string bytes;
    append(bytes, values.data(), values.size() * sizeof(float));
    return bytes;
}

// The directory: per tensor in buffer order, its name (48 bytes) and ndim, dims[0], dims[1], 0.
static std::string model_directory(const GPTConfig& c) {
    std::string out;
    for (const GPTParameter& p : gpt_parameter_layout(c)) {
        char name[directory_name_bytes] = {};
        snprintf(name, sizeof name, "%s", p.name.c_str());
        int32_t dims[4] = {int32_t(p.shape.size()), p.shape[0], p.shape.size() > 1 ? p.shape[1] : 0,
                           0};
        append(out, name, sizeof name);
        append(out, dims, sizeof dims);
    }
    return out;
}

void gpt_save(GPT& model, const char* path, const std::vector<FileSection>& sections) {
    const GPTConfig& c = model.config;
    std::string directory = model_directory(c), parameters;
    std::vector<float> values =  // the values the model computes with
        gpt_file_order(c, download(model.params.data, model.params.size));
    append(parameters, values.data(), values.size() * sizeof(float));
    int32_t header[header_ints] = {model_file_magic,
                                   model_file_version,
                                   c.vocab_size,
                                   c.context,
                                   c.dim,
                                   c.layers,
                                   c.heads,
                                   c.mlp_ratio,
                                   c.norm == Norm::rmsnorm,
                                   c.activation == Activation::swiglu,
                                   c.rotary,
                                   c.tied_embeddings,
                                   float_bits(c.dropout),
                                   float_bits(c.attention_dropout),
                                   int32_t(directory.size() / (directory_name_bytes + 16)),
                                   int32_t(sections.size())};
    int64_t count = int64_t(values.size());
    memcpy(&header[count_field], &count, 8);
    header[directory_crc_field] = int32_t(crc32(directory.data(), directory.size()));
    header[parameters_crc_field] = int32_t(crc32(parameters.data(), parameters.size()));
    header[header_crc_field] = int32_t(crc32(header, sizeof header));
    std::string out;
    append(out, header, sizeof header);
    out += directory + parameters;
    for (const FileSection& s : sections) {
        int64_t length = int64_t(s.bytes.size());
        uint32_t crc = crc32(s.bytes.data(), s.bytes.size());
        append(out, s.tag, 4);
        append(out, &length, 8);
        append(out, &crc, 4);
        out += s.bytes;
    }
    write_file_atomic(path, out.data(), out.size(), "model file");
}

// The header's config, checked (sizes bounded before anything is computed from them).
static GPTConfig header_config(const int32_t* header, const char* path) {
    GPTConfig c;
    c.vocab_size = header[2], c.context = header[3], c.dim = header[4], c.layers = header[5];
    c.heads = header[6], c.mlp_ratio = header[7];
    for (int field = 8; field <= 11; field++)
        if (header[field] != 0 && header[field] != 1)
            fail("model file '%s': header field %d is %d, expected 0 or 1", path, field,
                 header[field]);
    c.norm = header[8] ? Norm::rmsnorm : Norm::layernorm;
    c.activation = header[9] ? Activation::swiglu : Activation::gelu;
    c.rotary = header[10] != 0, c.tied_embeddings = header[11] != 0;
    c.dropout = bits_float(header[12]), c.attention_dropout = bits_float(header[13]);
    try {
        gpt_check_config(c);
    } catch (const std::runtime_error& error) {
        fail("model file '%s': %s", path, error.what());
    }
    return c;
}

// The header: magic, version, its own checksum, reserved fields zero, the config.
static GPTConfig read_model_header(ByteReader& reader, int32_t* header) {
    const char* path = reader.path;
    reader.read(header, header_ints * sizeof(int32_t), "the header");
    if (header[magic_field] != model_file_magic)
        fail("model file '%s': bad magic 0x%08x, expected 0x%08x (not a Tricycle model)", path,
             header[magic_field], model_file_magic);
    if (header[version_field] != model_file_version)
        fail("model file '%s': version %d, this build reads version %d", path,
             header[version_field], model_file_version);
    int32_t zeroed[header_ints];
    memcpy(zeroed, header, sizeof zeroed);
    zeroed[header_crc_field] = 0;
    if (uint32_t(header[header_crc_field]) != crc32(zeroed, sizeof zeroed))
        fail("model file '%s': the header's checksum does not match (a corrupt file)", path);
    for (int field = first_reserved_field; field < header_ints; field++)
        if (header[field] != 0)
            fail("model file '%s': reserved header field %d is %d, expected 0", path, field,
                 header[field]);
    return header_config(header, path);
}

// A section tag as an error message shows it: its four characters when they are printable, or
// their bytes in hex (a corrupt tag may hold a newline or a NUL).
static std::string printable_tag(const char tag[4]) {
    bool printable = true;
    for (int i = 0; i < 4; i++) printable &= tag[i] >= 0x20 && tag[i] < 0x7f;
    const unsigned char* b = reinterpret_cast<const unsigned char*>(tag);
    char shown[16];
    if (printable) snprintf(shown, sizeof(shown), "'%c%c%c%c'", b[0], b[1], b[2], b[3]);
    else snprintf(shown, sizeof(shown), "0x%02x%02x%02x%02x", b[0], b[1], b[2], b[3]);
    return shown;
}

// The sections: each tag at most once, each length within the file, each payload's checksum.
static void read_model_sections(ByteReader& reader, int count, std::vector<FileSection>* sections) {
    const char* path = reader.path;
    std::vector<std::string> tags;
    for (int s = 0; s < count; s++) {
        FileSection section;
        int64_t length;
        uint32_t crc;
        reader.read(section.tag, 4, "a section header");
        reader.read(&length, 8, "a section header");
        reader.read(&crc, 4, "a section header");
        std::string tag(section.tag, 4), shown = printable_tag(section.tag);
        if (std::find(tags.begin(), tags.end(), tag) != tags.end())
            fail("model file '%s': section %s appears twice", path, shown.c_str());
        tags.push_back(tag);
        if (length < 0 || uint64_t(length) > reader.remaining())
            fail("model file '%s': truncated: section %s claims %lld bytes, %zu are left", path,
                 shown.c_str(), (long long)length, reader.remaining());
        const char* payload = reader.data.data() + reader.position;
        if (crc32(payload, size_t(length)) != crc)
            fail("model file '%s': section %s does not match its checksum (a corrupt file)", path,
                 shown.c_str());
        if (sections) section.bytes.assign(payload, size_t(length));
        reader.position += size_t(length);
        if (sections) sections->push_back(std::move(section));
    }
    if (reader.remaining() != 0)
        fail("model file '%s': %zu unexpected bytes after the last section", path,
             reader.remaining());
}

// Everything is checked against the file before anything is allocated: the header, the parameter
// count its config implies, the directory, the checksums, the sections.
void gpt_load(GPT* model, const char* path, std::vector<FileSection>* sections) {
    std::string data = read_whole_file(path, "model file", model_file_max_bytes);
    ByteReader reader{data, 0, "model file", path};
    int32_t header[header_ints];
    GPTConfig c = read_model_header(reader, header);
    int64_t count, expected_count = gpt_parameter_count(c);
    memcpy(&count, &header[count_field], 8);
    std::string directory = model_directory(c);
    if (count != expected_count ||
        header[tensors_field] != int32_t(directory.size() / (directory_name_bytes + 16)))
        fail("model file '%s': lists %d tensors and %lld parameters, its config needs %zu and %lld",
             path, header[tensors_field], (long long)count,
             directory.size() / (directory_name_bytes + 16), (long long)expected_count);
    if (header[sections_field] < 0 || header[sections_field] > 64)
        fail("model file '%s': %d sections, expected 0 to 64", path, header[sections_field]);
    if (reader.remaining() < directory.size() ||
        (reader.remaining() - directory.size()) / sizeof(float) < uint64_t(count))
        fail(
            "model file '%s': truncated: %lld parameters and their directory need more than the "
            "%zu bytes left",
            path, (long long)count, reader.remaining());
    bool directory_crc_matches = crc32(data.data() + reader.position, directory.size()) ==
                                 uint32_t(header[directory_crc_field]);
    if (data.compare(reader.position, directory.size(), directory) != 0)
        fail("model file '%s': the tensor directory is not the one its config implies%s", path,
             directory_crc_matches ? "" : " (and does not match its checksum)");
    if (!directory_crc_matches)
        fail("model file '%s': the tensor directory does not match its checksum (a corrupt file)",
             path);
    reader.position += directory.size();
    std::vector<float> values(count);
    reader.read(values.data(), values.size() * sizeof(float), "the parameters");
    if (crc32(values.data(), values.size() * sizeof(float)) !=
        uint32_t(header[parameters_crc_field]))
        fail("model file '%s': the parameters do not match their checksum (a corrupt file)", path);
    for (int64_t i = 0; i < count; i++)
        if (!std::isfinite(values[i]))
            fail("model file '%s': parameter %lld is %g, not finite", path, (long long)i,
                 values[i]);
    read_model_sections(reader, header[sections_field], sections);
    gpt_create(model, c);
    std::vector<real> host = gpt_buffer_order(c, values);
    upload(model->params.data, host.data(), model->params.size);
    if (model->params.master) upload(model->params.master, host.data(), model->params.size);
}

std::vector<real> parameters_from_section(const GPTConfig& config, const FileSection& section,
                                          const char* path) {
    long n = gpt_parameter_count(config);
    if (long(section.bytes.size()) != n * long(sizeof(float)))
        fail("model file '%s': section '%.4s' holds %zu bytes, expected %ld", path, section.tag,
             section.bytes.size(), n * long(sizeof(float)));
    std::vector<float> values(n);
    memcpy(values.data(), section.bytes.data(), n * sizeof(float));
    for (long i = 0; i < n; i++)
        if (!std::isfinite(values[i]))
            fail("model file '%s': section '%.4s' value %ld is %g, not finite", path, section.tag,
                 i, values[i]);
    return gpt_buffer_order(config, values);
}

// ====================================================================================================
// 4. The tokenizer

// ----------------------------------------------------------------------------------------------------
// Chunking: the hand-written scanner that cuts text into pieces before BPE.

enum ByteClass { BYTE_LETTER, BYTE_DIGIT, BYTE_SPACE, BYTE_OTHER };

static ByteClass byte_class(unsigned char c) {
    // Bytes >= 0x80 are the parts of multi-byte UTF-8 characters; calling them
    // letters keeps words like "café" or "naïve" in one chunk.
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return BYTE_LETTER;
    if (c >= '0' && c <= '9') return BYTE_DIGIT;
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\v' || c == '\f')
        return BYTE_SPACE;
    return BYTE_OTHER;
}

size_t tokenizer_chunk_length(const char* text, size_t length) {
    if (length == 0) return 0;
    const unsigned char* s = (const unsigned char*)text;
    // One leading space joins the run after it: " world" is a chunk, so the
    // space-before-a-word (the most common pattern in text) can merge with it.
    size_t begin = 0;
    if (length >= 2 && s[0] == ' ' && byte_class(s[1]) != BYTE_SPACE) begin = 1;
    ByteClass kind = byte_class(s[begin]);
    size_t end = begin + 1;
    while (end < length && byte_class(s[end]) == kind) end++;
    // "\n    return": the indentation run gives up its last space to " return".
    if (kind == BYTE_SPACE && end < length && end >= 2 && s[end - 1] == ' ') end--;
    return end;
}

// GPT-2's classes for ASCII, as the pattern's \p{L}, \p{N} and \s see them.
static UnicodeClass ascii_class(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return UnicodeClass::letter;
    if (c >= '0' && c <= '9') return UnicodeClass::number;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return UnicodeClass::space;
    return UnicodeClass::other;
}

static UnicodeClass code_point_class(uint32_t code_point) {
    int low = 0, high = unicode_range_count - 1;  // binary search over the sorted ranges
    while (low <= high) {
        int middle = (low + high) / 2;
        if (code_point < unicode_ranges[middle].first) high = middle - 1;
        else if (code_point > unicode_ranges[middle].last) low = middle + 1;
        else return unicode_ranges[middle].kind;
    }
    return UnicodeClass::other;
}

// The length of the valid UTF-8 sequence at s[0] (strict: no overlong forms, surrogates or code
// points above 0x10FFFF) and its code point; 0 when s[0] does not start one.
static size_t utf8_decode(const unsigned char* s, size_t length, uint32_t* code_point) {
    unsigned char c = s[0];
    size_t n;
    unsigned char low = 0x80, high = 0xBF;  // the range of the second byte
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        n = 3, low = c == 0xE0 ? 0xA0 : 0x80, high = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4)
        n = 4, low = c == 0xF0 ? 0x90 : 0x80, high = c == 0xF4 ? 0x8F : 0xBF;
    else return 0;
    if (length < n || s[1] < low || s[1] > high) return 0;
    uint32_t value = c & (0x7F >> n);
    for (size_t i = 1; i < n; i++) {
        if (i > 1 && (s[i] & 0xC0) != 0x80) return 0;
        value = (value << 6) | (s[i] & 0x3F);
    }
    *code_point = value;
    return n;
}

// The class of the character at s[0] and its length in bytes (length > 0).
static UnicodeClass character_class(const unsigned char* s, size_t length, size_t* bytes) {
    *bytes = 1;
    if (s[0] < 0x80) return ascii_class(s[0]);
    uint32_t code_point;
    size_t n = utf8_decode(s, length, &code_point);
    if (n == 0) return UnicodeClass::other;  // not UTF-8: a character of its own
    *bytes = n;
    return code_point_class(code_point);
}

// 's 't 're 've 'm 'll 'd at s[0]: their length, else 0.
static size_t contraction_length(const unsigned char* s, size_t length) {
    if (length < 2 || s[0] != '\'') return 0;
    if (s[1] == 's' || s[1] == 't' || s[1] == 'm' || s[1] == 'd') return 2;
    if (length < 3) return 0;
    if ((s[1] == 'r' && s[2] == 'e') || (s[1] == 'v' && s[2] == 'e') ||
        (s[1] == 'l' && s[2] == 'l'))
        return 3;
    return 0;
}

size_t tokenizer_gpt2_chunk_length(const char* text, size_t length) {
    if (length == 0) return 0;
    const unsigned char* s = (const unsigned char*)text;
    if (size_t n = contraction_length(s, length)) return n;
    size_t bytes;
    UnicodeClass kind = character_class(s, length, &bytes);
    size_t end = bytes;
    if (s[0] == ' ' && length > 1) {  // " ?\p{L}+" and the like: one space joins the run after it
        UnicodeClass next = character_class(s + 1, length - 1, &bytes);
        if (next != UnicodeClass::space) kind = next, end = 1 + bytes;
    }
    size_t last_start = 0;  // where the run's last character starts
    while (end < length && character_class(s + end, length - end, &bytes) == kind)
        last_start = end, end += bytes;
    // "\s+(?!\S)": a run of two or more white-space characters before a non-space character
    // leaves its last one to the next chunk.
    if (kind == UnicodeClass::space && end < length && last_start > 0) return last_start;
    return end;
}

// Finds the next end-of-text separator in [text, end); returns end if none.
static const char* find_separator(const char* text, const char* end, const std::string& separator) {
    size_t n = separator.size();
    if (n == 0) return end;
    const char* p = text;
    while ((size_t)(end - p) >= n) {
        const char* hit = (const char*)memchr(p, separator[0], (size_t)(end - p) - n + 1);
        if (!hit) break;
        if (memcmp(hit, separator.data(), n) == 0) return hit;
        p = hit + 1;
    }
    return end;
}

// A pair of token ids packed into one integer, for hash maps. Comparing keys
// compares (left, right) lexicographically, which the tie-break relies on.
static uint64_t pair_key(int32_t left, int32_t right) {
    return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
}

// ----------------------------------------------------------------------------------------------------
// Tokenizer tables

// The bytes of the token in merge-order place `slot`.
static std::string_view slot_bytes(const Tokenizer* tok, int slot) {
    size_t start = tok->token_start[slot];
    return std::string_view(tok->token_bytes.data() + start, tok->token_start[slot + 1] - start);
}

// Rebuilds what follows from the merges: each token's bytes, the pair -> rank
// lookup, and an empty encoder cache.
static void tokenizer_build_tables(Tokenizer* tok) {
    int num_merges = (int)tok->merges.size();
    tok->vocab_size = byte_tokens + num_merges + 1;
    tok->eot_token = tok->id_of_slot.empty() ? tok->vocab_size - 1 : tok->id_of_slot.back();

    // token_start[id] is where token id's bytes begin, and so where token id-1's end.
    tok->token_bytes.clear();
    tok->token_start.assign(tok->vocab_size + 1, 0);
    for (int id = 0; id < byte_tokens; id++) {
        tok->token_start[id] = tok->token_bytes.size();
        tok->token_bytes.push_back((char)id);
    }
    for (int i = 0; i < num_merges; i++) {
        // A merged token's bytes are its left part's bytes then its right part's.
        // Both parts are older tokens, so their ends are already recorded. The
        // piece is built in a copy because appending to token_bytes may move it.
        int id = byte_tokens + i;
        tok->token_start[id] = tok->token_bytes.size();
        std::string piece = std::string(slot_bytes(tok, tok->merges[i].left));
        piece += slot_bytes(tok, tok->merges[i].right);
        tok->token_bytes += piece;
    }
    tok->token_start[tok->vocab_size - 1] = tok->token_bytes.size();
    tok->token_bytes += tok->eot_name;
    tok->token_start[tok->vocab_size] = tok->token_bytes.size();

    tok->merge_rank.clear();
    tok->merge_rank.reserve(num_merges);
    for (int i = 0; i < num_merges; i++)
        tok->merge_rank[pair_key(tok->merges[i].left, tok->merges[i].right)] = i;

    tok->cache.clear();
    tok->cache_keys.clear();
    tok->cache_tokens.clear();
}

std::string_view tokenizer_token_bytes(const Tokenizer* tok, int token) {
    if (token < 0 || token >= tok->vocab_size)
        fail("token %d is outside the vocabulary [0, %d)", token, tok->vocab_size);
    return slot_bytes(tok, tok->slot_of_id.empty() ? token : tok->slot_of_id[token]);
}

// ----------------------------------------------------------------------------------------------------
// Training
//
// The text is cut into chunks, and identical chunks are counted once: the
// "words" below are the distinct chunks with their frequencies, each held as its
// current sequence of symbols (token ids). A pair's count is the number of times
// it occurs adjacently, summed over words weighted by word frequency.
//
// A full recount after every merge would cost O(text) per merge. Instead we
// keep, for every pair, its count and the list of words it occurs in. Merging
// (a, b) -> c only visits the words in the list of (a, b), and in each changes
// the counts of the pairs around every occurrence: (x, a) and (b, y) lose an
// occurrence, (x, c) and (c, y) gain one. The best pair comes from a max-heap
// with lazy invalidation: entries are never removed when a count changes;
// instead a popped entry whose count is out of date is re-pushed with the
// current count. Counts of existing pairs only ever go down (only pairs that
// contain the new token c go up, and those are pushed fresh), so a heap entry
// never under-states its pair, and the first up-to-date entry popped is the
// true best.

struct TrainWord {
    int64_t count;  // how often this chunk occurs in the text
    size_t start;   // its symbols are symbols[start, start + length)
    size_t length;  // shrinks as merges join symbols
};

struct PairInfo {
    int64_t count = 0;
    std::vector<int32_t> words;  // words that contain the pair (may hold stale entries)
};

struct HeapEntry {
    int64_t count;
    uint64_t key;
};

// std::priority_queue pops the "largest": the highest count, and among equal
// counts the smallest (left, right).
struct HeapOrder {
    bool operator()(const HeapEntry& a, const HeapEntry& b) const {
        if (a.count != b.count) return a.count < b.count;
        return a.key > b.key;
    }
};

struct BpeTrainer {
    std::vector<TrainWord> words;
    std::vector<int32_t> symbols;
    std::unordered_map<uint64_t, PairInfo> pairs;
    std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapOrder> heap;
    std::vector<uint64_t> new_pairs;  // pairs that gained occurrences in the current merge
    std::vector<int> word_visited;    // the merge that last visited each word
    std::vector<int32_t> token_length =
        std::vector<int32_t>(byte_tokens, 1);  // bytes of each token
};

static void change_pair_count(BpeTrainer* tr, uint64_t key, int64_t delta, int32_t word) {
    PairInfo& info = tr->pairs[key];
    info.count += delta;
    if (delta > 0) {
        // Words are visited one at a time, so checking the last entry avoids duplicates.
        if (info.words.empty() || info.words.back() != word) info.words.push_back(word);
        tr->new_pairs.push_back(key);
    } else if (info.count == 0) {
        tr->pairs.erase(key);  // stale heap entries for it will find no pair and be dropped
    }
}

// Replaces every (a, b) in word w by c, left to right, and updates the
// neighbouring pair counts. Changes to (a, b) itself are skipped: every
// occurrence disappears, so its count is simply dropped by the caller.
static void merge_in_word(BpeTrainer* tr, int32_t w, int32_t a, int32_t b, int32_t c) {
    uint64_t merged_key = pair_key(a, b);
    TrainWord& word = tr->words[w];
    int32_t* sym = &tr->symbols[word.start];
    int64_t count = word.count;
    size_t n = word.length;
    size_t out = 0;  // symbols [0, out) are final; the rest still to be scanned
    size_t i = 0;
    while (i < n) {
        if (i + 1 < n && sym[i] == a && sym[i + 1] == b) {
            if (out > 0) {  // the left neighbour x (possibly a c made just before)
                int32_t x = sym[out - 1];
                if (pair_key(x, a) != merged_key) change_pair_count(tr, pair_key(x, a), -count, w);
                change_pair_count(tr, pair_key(x, c), count, w);
            }
            if (i + 2 < n) {  // the right neighbour y (not yet scanned)
                int32_t y = sym[i + 2];
                if (pair_key(b, y) != merged_key) change_pair_count(tr, pair_key(b, y), -count, w);
                change_pair_count(tr, pair_key(c, y), count, w);
            }
            sym[out++] = c;
            i += 2;
        } else {
            sym[out++] = sym[i++];
        }
    }
    word.length = out;
}

// 1. The distinct chunks of the text and how often each occurs. The separators between documents
//    are not text: they are skipped, and chunks never span them.
static std::unordered_map<std::string_view, int64_t> count_chunks(const char* text, size_t length,
                                                                  const std::string& separator) {
    std::unordered_map<std::string_view, int64_t> chunk_counts;
    const char* end = text + length;
    const char* p = text;
    while (p < end) {
        const char* piece_end = find_separator(p, end, separator);
        while (p < piece_end) {
            size_t n = tokenizer_chunk_length(p, (size_t)(piece_end - p));
            if (n >= 2) chunk_counts[std::string_view(p, n)]++;  // 1-byte chunks can never merge
            p += n;
        }
        if (piece_end < end) p = piece_end + separator.size();
    }
    return chunk_counts;
}

// 2. Each distinct chunk becomes a word of byte symbols, and its pairs are counted.
static void start_training(BpeTrainer* tr,
                           const std::unordered_map<std::string_view, int64_t>& chunk_counts) {
    tr->words.reserve(chunk_counts.size());
    for (const auto& [chunk, count] : chunk_counts) {
        tr->words.push_back(TrainWord{count, tr->symbols.size(), chunk.size()});
        for (char byte : chunk) tr->symbols.push_back((unsigned char)byte);
    }
    for (size_t w = 0; w < tr->words.size(); w++) {
        const TrainWord& word = tr->words[w];
        const int32_t* sym = &tr->symbols[word.start];
        for (size_t i = 0; i + 1 < word.length; i++)
            change_pair_count(tr, pair_key(sym[i], sym[i + 1]), word.count, (int32_t)w);
    }
    for (const auto& entry : tr->pairs) tr->heap.push(HeapEntry{entry.second.count, entry.first});
    tr->new_pairs.clear();  // every pair is new here, and already in the heap
    tr->word_visited.assign(tr->words.size(), -1);
}

// The most frequent pair (ties: the smallest) off the heap, skipping out-of-date entries (they
// go back with their current count); false when no pair is left.
static bool pop_best_pair(BpeTrainer* tr, uint64_t* key) {
    while (!tr->heap.empty()) {
        HeapEntry best = tr->heap.top();
        tr->heap.pop();
        auto it = tr->pairs.find(best.key);
        int64_t current = (it == tr->pairs.end()) ? 0 : it->second.count;
        int32_t left = int32_t(best.key >> 32), right = int32_t(best.key & 0xFFFFFFFFu);
        if (current == best.count &&
            tr->token_length[left] + tr->token_length[right] > max_token_bytes) {
            tr->pairs.erase(best.key);  // its token would be too long to decode: never merged
            continue;
        }
        if (current == best.count) {
            *key = best.key;
            return true;
        }
        if (current > 0) tr->heap.push(HeapEntry{current, best.key});
    }
    return false;
}

// 3. Merge number merge_index: the pair becomes token c in every word that holds it, and each pair
//    that gained occurrences goes on the heap once, with its final count.
static void apply_merge(BpeTrainer* tr, uint64_t key, int merge_index) {
    int32_t a = (int32_t)(key >> 32), b = (int32_t)(key & 0xFFFFFFFFu),
            c = byte_tokens + merge_index;
    tr->token_length.push_back(tr->token_length[a] + tr->token_length[b]);
    std::vector<int32_t> affected = std::move(tr->pairs[key].words);
    tr->pairs.erase(key);
    tr->new_pairs.clear();
    for (int32_t w : affected) {
        if (tr->word_visited[w] == merge_index) continue;
        tr->word_visited[w] = merge_index;
        merge_in_word(tr, w, a, b, c);
    }
    std::sort(tr->new_pairs.begin(), tr->new_pairs.end());
    tr->new_pairs.erase(std::unique(tr->new_pairs.begin(), tr->new_pairs.end()),
                        tr->new_pairs.end());
    for (uint64_t k : tr->new_pairs) {
        auto it = tr->pairs.find(k);
        if (it != tr->pairs.end()) tr->heap.push(HeapEntry{it->second.count, k});
    }
}

void tokenizer_train(Tokenizer* tok, const char* text, size_t length, int vocab_size) {
    int min_vocab = byte_tokens + 1;
    if (vocab_size < min_vocab)
        fail("vocab size %d is too small: need at least %d (256 bytes + end-of-text)", vocab_size,
             min_vocab);
    std::string separator = end_of_text_name;
    BpeTrainer tr;
    start_training(&tr, count_chunks(text, length, separator));
    // Merge the best pair until the vocabulary is full or no pair is left.
    std::vector<TokenPair> merges;
    uint64_t key;
    while ((int)merges.size() < vocab_size - min_vocab && pop_best_pair(&tr, &key)) {
        merges.push_back(TokenPair{int32_t(key >> 32), int32_t(key & 0xFFFFFFFFu)});
        apply_merge(&tr, key, int(merges.size()) - 1);
    }
    tok->merges = merges;
    tok->eot_name = separator;
    tok->pretokenizer = Pretokenizer::tricycle;
    tok->id_of_slot.clear();
    tok->slot_of_id.clear();
    tokenizer_build_tables(tok);
}

// ----------------------------------------------------------------------------------------------------
// Saving and loading

std::string tokenizer_serialize(const Tokenizer* tok) {
    // Version 1 unless the file needs version 2's fields, so that files and fingerprints made
    // before version 2 existed stay the same.
    bool version2 = tok->pretokenizer != Pretokenizer::tricycle || !tok->id_of_slot.empty();
    std::vector<int32_t> ints;
    ints.push_back((int32_t)tokenizer_magic);
    ints.push_back(version2 ? tokenizer_version_ids : tokenizer_version);
    ints.push_back(tok->vocab_size);
    ints.push_back((int32_t)tok->merges.size());
    ints.push_back(1);  // one special token: end-of-text
    if (version2) ints.push_back((int32_t)tok->pretokenizer);
    for (const TokenPair& merge : tok->merges) {
        ints.push_back(merge.left);
        ints.push_back(merge.right);
    }
    ints.push_back(tok->eot_token);
    ints.push_back((int32_t)tok->eot_name.size());
    std::string data((const char*)ints.data(), ints.size() * sizeof(int32_t));
    data += tok->eot_name;
    if (version2)
        for (int slot = 0; slot < tok->vocab_size; slot++) {
            int32_t id = tok->id_of_slot.empty() ? slot : tok->id_of_slot[slot];
            data.append((const char*)&id, sizeof id);
        }
    return data;
}

uint32_t tokenizer_fingerprint(const Tokenizer* tok) {
    std::string bytes = tokenizer_serialize(tok);
    uint32_t crc = crc32(bytes.data(), bytes.size());
    return crc ? crc : 1;
}

void tokenizer_save(const Tokenizer* tok, const char* path) {
    std::string data = tokenizer_serialize(tok);
    write_file_atomic(path, data.data(), data.size(), "tokenizer file");
}

static int32_t read_int32(ByteReader& r, const char* what) {
    int32_t value;
    r.read(&value, 4, what);
    return value;
}

// A vocabulary of tens of millions of tokens fits in 1 GiB (8 bytes a merge, 4 an id); a bigger
// file is not a tokenizer, and is refused before it is read into memory.
constexpr size_t tokenizer_file_max_bytes = size_t(1) << 30;

void tokenizer_load(Tokenizer* tok, const char* path) {
    tokenizer_parse(tok, read_whole_file(path, "tokenizer file", tokenizer_file_max_bytes), path);
}

// The merges: each pair of tokens defined before it, none repeated, none making a token longer than
// max_token_bytes (a chain of merges can double a token's length at each step).
static std::vector<TokenPair> read_merges(ByteReader& r, int num_merges) {
    const char* path = r.path;
    std::vector<TokenPair> merges(num_merges);
    std::vector<int64_t> length(byte_tokens + num_merges, 1);
    std::unordered_map<uint64_t, int> seen;  // pair -> first merge index, to catch repeats
    for (int i = 0; i < num_merges; i++) {
        int32_t left = read_int32(r, "a merge"), right = read_int32(r, "a merge");
        int defined = byte_tokens + i;  // bytes and earlier merges
        if (left < 0 || left >= defined || right < 0 || right >= defined)
            fail(
                "tokenizer file '%s': merge %d (%d, %d) uses a token not defined before it (ids "
                "must be < %d)",
                path, i, left, right, defined);
        auto inserted = seen.emplace(pair_key(left, right), i);
        if (!inserted.second)
            fail("tokenizer file '%s': merge %d (%d, %d) repeats merge %d", path, i, left, right,
                 inserted.first->second);
        length[defined] = length[left] + length[right];
        if (length[defined] > max_token_bytes)
            fail("tokenizer file '%s': merge %d makes a token of %lld bytes, more than %d", path, i,
                 (long long)length[defined], max_token_bytes);
        merges[i] = TokenPair{left, right};
    }
    return merges;
}

// Version 2's id table: a permutation of 0..vocab_size-1 whose last entry is the end-of-text id.
static void read_id_table(ByteReader& r, int vocab_size, int eot_id,
                          std::vector<int32_t>* id_of_slot, std::vector<int32_t>* slot_of_id) {
    if (r.remaining() / 4 < (size_t)vocab_size)
        fail("tokenizer file '%s': truncated: %zu bytes left, too short for %d token ids", r.path,
             r.remaining(), vocab_size);
    id_of_slot->resize(vocab_size);
    slot_of_id->assign(vocab_size, -1);
    for (int slot = 0; slot < vocab_size; slot++) {
        int32_t id = read_int32(r, "a token id");
        if (id < 0 || id >= vocab_size || (*slot_of_id)[id] >= 0)
            fail(
                "tokenizer file '%s': the id table is not a permutation of 0..%d (token %d has id "
                "%d)",
                r.path, vocab_size - 1, slot, id);
        (*id_of_slot)[slot] = id;
        (*slot_of_id)[id] = slot;
    }
    if (id_of_slot->back() != eot_id)
        fail("tokenizer file '%s': end-of-text id %d, but the id table gives it %d", r.path, eot_id,
             id_of_slot->back());
}

void tokenizer_parse(Tokenizer* tok, const std::string& data, const char* path) {
    ByteReader r{data, 0, "tokenizer file", path};
    uint32_t magic = uint32_t(read_int32(r, "the magic number"));
    if (magic != tokenizer_magic)
        fail("tokenizer file '%s': bad magic 0x%08x, expected 0x%08x", path, magic,
             tokenizer_magic);
    int version = read_int32(r, "the version");
    if (version != tokenizer_version && version != tokenizer_version_ids)
        fail("tokenizer file '%s': unsupported version %d, expected %d or %d", path, version,
             tokenizer_version, tokenizer_version_ids);
    int vocab_size = read_int32(r, "the vocab size");
    int num_merges = read_int32(r, "the merge count");
    int num_special = read_int32(r, "the special token count");
    int pretokenizer = version == tokenizer_version ? 0 : read_int32(r, "the pretokenizer");
    if (pretokenizer != (int)Pretokenizer::tricycle && pretokenizer != (int)Pretokenizer::gpt2)
        fail("tokenizer file '%s': pretokenizer %d, expected 0 (tricycle) or 1 (gpt2)", path,
             pretokenizer);
    if (num_merges < 0) fail("tokenizer file '%s': negative merge count %d", path, num_merges);
    if (num_special != 1)
        fail("tokenizer file '%s': has %d special tokens, expected 1 (end-of-text)", path,
             num_special);
    int64_t expected_vocab = (int64_t)byte_tokens + num_merges + num_special;
    if (vocab_size != expected_vocab)
        fail("tokenizer file '%s': vocab size %d, but 256 bytes + %d merges + %d special = %lld",
             path, vocab_size, num_merges, num_special, (long long)expected_vocab);
    // Check the length before allocating, so a corrupt count cannot ask for gigabytes.
    if (r.remaining() / 8 < (size_t)num_merges)
        fail("tokenizer file '%s': truncated: %zu bytes, too short for %d merges", path,
             data.size(), num_merges);
    std::vector<TokenPair> merges = read_merges(r, num_merges);
    int eot_id = read_int32(r, "the end-of-text id");
    if (version == tokenizer_version && eot_id != vocab_size - 1)
        fail("tokenizer file '%s': end-of-text id %d, expected %d (the last id)", path, eot_id,
             vocab_size - 1);
    int name_length = read_int32(r, "the end-of-text name length");
    if (name_length < 1 || name_length > 256)
        fail("tokenizer file '%s': end-of-text name length %d, expected 1..256", path, name_length);
    std::string eot_name(name_length, '\0');
    r.read(&eot_name[0], name_length, "the end-of-text name");
    std::vector<int32_t> id_of_slot, slot_of_id;
    if (version == tokenizer_version_ids)
        read_id_table(r, vocab_size, eot_id, &id_of_slot, &slot_of_id);
    if (r.remaining() != 0)
        fail("tokenizer file '%s': %zu bytes of trailing data after its last field", path,
             r.remaining());
    tok->merges = merges;
    tok->eot_name = eot_name;
    tok->pretokenizer = Pretokenizer(pretokenizer);
    tok->id_of_slot = id_of_slot;
    tok->slot_of_id = slot_of_id;
    tokenizer_build_tables(tok);
}

// ----------------------------------------------------------------------------------------------------
// Encoding
//
// Each chunk is encoded on its own: start from its bytes and apply merges in
// the order they were learned (lowest rank first; among equal ranks, left to
// right). A min-heap holds candidate merges (rank, position) over a linked list
// of symbols. A merge of rank r only creates pairs containing the new token
// 256 + r, and those have ranks > r (a merge can only use earlier tokens), so
// ranks come off the heap in non-decreasing order: the same result as the
// textbook loop "find the lowest-rank pair, merge all its occurrences, repeat",
// in O(n log n) instead of O(n^2).

// Limits on the chunk cache. Long chunks are rare and seldom repeat; the entry
// cap bounds memory on inputs that never repeat (random bytes) - real text
// needs far fewer (31 MB of Python source: about 95k distinct chunks).
static const size_t max_cached_chunk = 64;
static const size_t max_cache_entries = 1u << 20;

static bool candidate_after(const MergeCandidate& x, const MergeCandidate& y) {
    // "x comes after y": used as the heap's less-than, so the front is the lowest rank.
    if (x.rank != y.rank) return x.rank > y.rank;
    return x.position > y.position;
}

static void push_candidate(Tokenizer* tok, int32_t position, int32_t right_position) {
    uint64_t key = pair_key(tok->work_ids[position], tok->work_ids[right_position]);
    auto it = tok->merge_rank.find(key);
    if (it == tok->merge_rank.end()) return;
    tok->work_heap.push_back(MergeCandidate{it->second, position});
    std::push_heap(tok->work_heap.begin(), tok->work_heap.end(), candidate_after);
}

static void encode_chunk(Tokenizer* tok, const char* chunk, size_t length,
                         std::vector<int32_t>* out) {
    if (length > (size_t)INT32_MAX) fail("encode: a single chunk of %zu bytes is too long", length);
    int32_t n = (int32_t)length;
    std::vector<int32_t>& ids = tok->work_ids;    // ids[i] == -1: merged into its left neighbour
    std::vector<int32_t>& next = tok->work_next;  // linked list of live symbols; n means none
    std::vector<int32_t>& prev = tok->work_prev;  // -1 means none
    ids.resize(n);
    next.resize(n);
    prev.resize(n);
    for (int32_t i = 0; i < n; i++) {
        ids[i] = (unsigned char)chunk[i];
        next[i] = i + 1;
        prev[i] = i - 1;
    }
    tok->work_heap.clear();
    for (int32_t i = 0; i + 1 < n; i++) push_candidate(tok, i, i + 1);

    while (!tok->work_heap.empty()) {
        std::pop_heap(tok->work_heap.begin(), tok->work_heap.end(), candidate_after);
        MergeCandidate candidate = tok->work_heap.back();
        tok->work_heap.pop_back();
        int32_t i = candidate.position;
        if (ids[i] < 0) continue;  // this symbol was merged away
        int32_t j = next[i];
        if (j >= n) continue;
        const TokenPair& merge = tok->merges[candidate.rank];
        if (ids[i] != merge.left || ids[j] != merge.right) continue;  // the pair has changed since
        // Join i and j into the new token, unlink j, and look at the two new pairs.
        ids[i] = byte_tokens + candidate.rank;
        ids[j] = -1;
        next[i] = next[j];
        if (next[j] < n) prev[next[j]] = i;
        if (prev[i] >= 0) push_candidate(tok, prev[i], i);
        if (next[i] < n) push_candidate(tok, i, next[i]);
    }
    for (int32_t i = 0; i < n; i = next[i]) out->push_back(ids[i]);
}

// Encodes text that contains no separator, chunk by chunk, through the cache.
static void encode_piece(Tokenizer* tok, const char* text, size_t length,
                         std::vector<int32_t>* out) {
    size_t pos = 0;
    while (pos < length) {
        const char* chunk = text + pos;
        size_t n = tok->pretokenizer == Pretokenizer::gpt2
                       ? tokenizer_gpt2_chunk_length(chunk, length - pos)
                       : tokenizer_chunk_length(chunk, length - pos);
        pos += n;
        if (n == 1) {
            out->push_back((unsigned char)chunk[0]);
            continue;
        }
        if (n > max_cached_chunk) {
            encode_chunk(tok, chunk, n, out);
            continue;
        }
        auto it = tok->cache.find(std::string_view(chunk, n));
        if (it != tok->cache.end()) {
            const int32_t* cached = tok->cache_tokens.data() + it->second.offset;
            out->insert(out->end(), cached, cached + it->second.count);
            continue;
        }
        size_t first = out->size();
        encode_chunk(tok, chunk, n, out);
        if (tok->cache.size() < max_cache_entries) {
            CachedChunk entry = {(uint32_t)tok->cache_tokens.size(),
                                 (uint32_t)(out->size() - first)};
            tok->cache_tokens.insert(tok->cache_tokens.end(), out->begin() + first, out->end());
            tok->cache_keys.emplace_back(chunk, n);
            tok->cache.emplace(std::string_view(tok->cache_keys.back()), entry);
        }
    }
}

void tokenizer_encode(Tokenizer* tok, const char* text, size_t length,
                      std::vector<int32_t>* tokens) {
    if (tok->vocab_size == 0) fail("encode: the tokenizer has not been trained or loaded");
    size_t first = tokens->size();
    const char* end = text + length;
    const char* p = text;
    while (p < end) {
        const char* piece_end = find_separator(p, end, tok->eot_name);
        encode_piece(tok, p, (size_t)(piece_end - p), tokens);
        if (piece_end == end) break;
        tokens->push_back(tok->vocab_size - 1);  // the end-of-text token's slot
        p = piece_end + tok->eot_name.size();
    }
    if (!tok->id_of_slot.empty())  // slots to ids
        for (size_t i = first; i < tokens->size(); i++)
            (*tokens)[i] = tok->id_of_slot[(*tokens)[i]];
}

void tokenizer_decode(const Tokenizer* tok, const int32_t* tokens, size_t count,
                      std::string* text) {
    for (size_t i = 0; i < count; i++) {
        int32_t id = tokens[i];
        if (id < 0 || id >= tok->vocab_size)
            fail("decode: token %d at index %zu is outside the vocabulary [0, %d)", id, i,
                 tok->vocab_size);
        text->append(slot_bytes(tok, tok->slot_of_id.empty() ? id : tok->slot_of_id[id]));
    }
}

// ====================================================================================================
// 5. Token files

void write_token_file(const char* path, const int32_t* tokens, size_t count, int vocab_size,
                      uint32_t tokenizer_fingerprint) {
    if (vocab_size <= 0) fail("token file '%s': vocab size %d must be positive", path, vocab_size);
    if (count > (size_t)INT32_MAX)
        fail("token file '%s': %zu tokens, more than the header can count (%d)", path, count,
             INT32_MAX);
    bool wide = vocab_size > 65536;
    size_t width = wide ? 4 : 2;
    size_t header_bytes = token_file_header_ints * sizeof(int32_t);
    std::vector<unsigned char> data(header_bytes + count * width, 0);
    int32_t header[token_file_header_ints] = {
        token_file_magic, wide ? token_file_version_u32 : token_file_version_u16, int32_t(count),
        int32_t(tokenizer_fingerprint)};
    memcpy(data.data(), header, header_bytes);
    unsigned char* body = data.data() + header_bytes;
    for (size_t i = 0; i < count; i++) {
        int32_t token = tokens[i];
        if (token < 0 || token >= vocab_size)
            fail("token file '%s': token %d at index %zu is outside the vocabulary [0, %d)", path,
                 token, i, vocab_size);
        uint16_t narrow = uint16_t(token);
        if (wide) memcpy(body + 4 * i, &token, 4);
        else memcpy(body + 2 * i, &narrow, 2);
    }
    write_file_atomic(path, data.data(), data.size(), "token file");
}

TokenFile::~TokenFile() {
    if (fd >= 0) close(fd);
}

// Tokens [first, first + count) into out, checking that the file still holds them.
void token_file_read(const TokenFile* file, size_t first, size_t count, int32_t* out) {
    size_t width = file->version == token_file_version_u16 ? 2 : 4, bytes = count * width;
    off_t offset = off_t(token_file_header_ints * sizeof(int32_t) + first * width);
    std::vector<unsigned char> raw(bytes);
    size_t done = 0;
    while (done < bytes) {
        ssize_t n = pread(file->fd, raw.data() + done, bytes - done, offset + off_t(done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0)
            fail("token file '%s': cannot read tokens %zu to %zu: %s", file->path.c_str(), first,
                 first + count,
                 n < 0 ? strerror(errno)
                       : "the file is shorter than when it was opened (changed while in use?)");
        done += size_t(n);
    }
    for (size_t i = 0; i < count; i++) {
        uint16_t narrow;
        uint32_t token;
        if (width == 2) memcpy(&narrow, &raw[2 * i], 2), token = narrow;
        else memcpy(&token, &raw[4 * i], 4);
        if (token >= uint32_t(file->vocab_size))
            fail("token file '%s': token %u at index %zu >= vocab size %d", file->path.c_str(),
                 token, first + i, file->vocab_size);
        out[i] = int32_t(token);
    }
}

void token_file_open(TokenFile* file, const char* path, int vocab_size, uint32_t fingerprint,
                     const char* tokenizer_name) {
    if (vocab_size <= 0) fail("token file '%s': vocab size %d must be positive", path, vocab_size);
    if (file->fd >= 0) close(file->fd), file->fd = -1;
    file->path = path, file->vocab_size = vocab_size;
    struct stat info;
    file->fd = open_for_reading(path, "token file", &info);
    if (!S_ISREG(info.st_mode))  // its tokens are read by offset
        fail("token file '%s': not a regular file (%s)", path,
             S_ISDIR(info.st_mode) ? "a folder" : "a pipe, socket or device");
    size_t size = (size_t)info.st_size, header_bytes = token_file_header_ints * sizeof(int32_t);
    int32_t header[token_file_header_ints];
    if (size < header_bytes || pread(file->fd, header, header_bytes, 0) != ssize_t(header_bytes))
        fail("token file '%s': truncated: %zu bytes, smaller than the %zu-byte header", path, size,
             header_bytes);
    if (header[0] != token_file_magic)
        fail("token file '%s': bad magic %d, expected %d", path, header[0], token_file_magic);
    int version = header[1];
    if (version != token_file_version_u16 && version != token_file_version_u32)
        fail(
            "token file '%s': unsupported version %d, expected 1 (uint16 tokens) or 2 (uint32 "
            "tokens)",
            path, version);
    if (header[2] < 0) fail("token file '%s': negative token count %d", path, header[2]);
    for (int i = 4; i < token_file_header_ints; i++)
        if (header[i] != 0)
            fail("token file '%s': reserved header field %d is %d, expected 0", path, i, header[i]);
    size_t count = (size_t)header[2], width = version == token_file_version_u16 ? 2 : 4;
    size_t expected = header_bytes + count * width;
    if (size < expected)
        fail("token file '%s': truncated: header says %zu tokens (%zu bytes), file has %zu bytes",
             path, count, expected, size);
    if (size > expected)
        fail(
            "token file '%s': %zu bytes of trailing data after the %zu tokens the header announces",
            path, size - expected, count);
    file->version = version, file->num_tokens = count,
    file->tokenizer_fingerprint = uint32_t(header[3]);
    if (fingerprint && file->tokenizer_fingerprint && file->tokenizer_fingerprint != fingerprint)
        fail(
            "token file '%s' was made with another tokenizer than %s (fingerprint %08x, expected "
            "%08x)",
            path, tokenizer_name, file->tokenizer_fingerprint, fingerprint);
    // Every token is checked once here, a block at a time, so that nothing downstream (the
    // embedding lookup on the GPU) ever sees an out-of-range id.
    std::vector<int32_t> block(1 << 20);
    for (size_t first = 0; first < count; first += block.size())
        token_file_read(file, first, std::min(block.size(), count - first), block.data());
}

std::vector<int32_t> read_token_file(const char* path, int vocab_size, uint32_t fingerprint,
                                     const char* tokenizer_name) {
    TokenFile file;
    token_file_open(&file, path, vocab_size, fingerprint, tokenizer_name);
    std::vector<int32_t> tokens(file.num_tokens);
    token_file_read(&file, 0, file.num_tokens, tokens.data());
    return tokens;
}

// ====================================================================================================
// 6. The data loader

void dataloader_open(DataLoader* loader, const char* path, int B, int T, int vocab_size,
                     DataLoaderMode mode, uint64_t seed, uint32_t fingerprint,
                     const char* tokenizer_name) {
    if (B < 1 || T < 1)
        fail("data loader for '%s': B and T must be >= 1, got B = %d, T = %d", path, B, T);
    token_file_open(&loader->file, path, vocab_size, fingerprint, tokenizer_name);
    size_t count = loader->file.num_tokens;
    // A window is T inputs plus one more token for the last target.
    if (count < (size_t)T + 1)
        fail("token file '%s': has %zu tokens, need at least T+1 = %d", path, count, T + 1);
    loader->B = B;
    loader->T = T;
    loader->mode = mode;
    loader->seed = seed;
    loader->sweep_windows = (count - 1) / (size_t)T;
    loader->inputs.assign((size_t)B * T, 0);
    loader->targets.assign((size_t)B * T, 0);
    loader->window.assign((size_t)T + 1, 0);
    dataloader_reset(loader);
}

void dataloader_reset(DataLoader* loader) {
    loader->rng_state = loader->seed;
    loader->sweep_next = 0;
}

// Window w of the sweep starts at token (w mod sweep_windows) * T.
void dataloader_seek_batch(DataLoader* loader, size_t batch) {
    loader->sweep_next = batch * size_t(loader->B) % loader->sweep_windows * size_t(loader->T);
}

void dataloader_next_batch(DataLoader* loader) {
    size_t count = loader->file.num_tokens;
    size_t T = (size_t)loader->T;
    for (int b = 0; b < loader->B; b++) {
        size_t start;
        if (loader->mode == DataLoaderMode::random) {
            start =
                (size_t)splitmix64_below(&loader->rng_state, count - T);  // starts 0 .. count-T-1
        } else {
            if (loader->sweep_next + T + 1 > count) loader->sweep_next = 0;  // wrap around
            start = loader->sweep_next;
            loader->sweep_next += T;
        }
        token_file_read(&loader->file, start, T + 1, loader->window.data());
        std::copy(loader->window.begin(), loader->window.end() - 1, &loader->inputs[b * T]);
        std::copy(loader->window.begin() + 1, loader->window.end(), &loader->targets[b * T]);
    }
}

uint64_t dataloader_get_rng_state(const DataLoader* loader) { return loader->rng_state; }

void dataloader_set_rng_state(DataLoader* loader, uint64_t state) { loader->rng_state = state; }

// ====================================================================================================
// 7. Command-line programs

bool wants_help(int argc, char** argv) {
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return true;
    return false;
}

const char* flag_value(int argc, char** argv, int* i) {
    const char* flag = argv[*i];
    if (*i + 1 >= argc) fail("flag %s needs a value", flag);
    const char* value = argv[*i + 1];
    if (strncmp(value, "--", 2) == 0) fail("flag %s needs a value, got '%s'", flag, value);
    *i += 1;
    return value;
}

long parse_int(const char* flag, const char* text, long min, long max) {
    char* end = nullptr;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno == ERANGE || value < min || value > max)
        fail("flag %s expects an integer from %ld to %ld, got '%s'", flag, min, max, text);
    return value;
}

double parse_number(const char* flag, const char* text, double min, double max) {
    char* end = nullptr;
    double value = strtod(text, &end);
    if (end == text || *end != '\0' || !(value >= min && value <= max))
        fail("flag %s expects a number from %g to %g, got '%s'", flag, min, max, text);
    return value;
}

void unknown_flag(const char* arg) {
    if (arg[0] == '-') fail("unknown flag '%s' (see --help)", arg);
    fail("unexpected argument '%s' (see --help)", arg);
}

double seconds_now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

int run_program(const char* name, const char* help, int argc, char** argv,
                int (*body)(int argc, char** argv)) {
    if (wants_help(argc, argv)) {
        fputs(help, stdout);
        return 0;
    }
    try {
        return body(argc, argv);
    } catch (const std::exception& error) {
        fflush(stdout);
        fprintf(stderr, "%s: error: %s\n", name, error.what());
        return 1;
    }
}
