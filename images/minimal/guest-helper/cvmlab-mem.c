// SPDX-License-Identifier: GPL-2.0-only
/*
 * cvmlab-mem: the guest memory helper of cvmlab's "minimal" image.
 *
 * It holds a buffer of known content in guest RAM so the host can act on the
 * guest physical pages behind it (punch them, balloon around them, convert
 * them) and the guest can then say exactly which pages changed.
 *
 *   cvmlab-mem hold --mib N --seed S [--lock] --state DIR [--timeout SEC]
 *   cvmlab-mem verify --state DIR [--expect-zero-gpa-ranges START:LEN[,...]]
 *                     [--max-list N] [--timeout SEC]
 *   cvmlab-mem gpas --state DIR [--timeout SEC]
 *   cvmlab-mem release --state DIR [--timeout SEC]
 *   cvmlab-mem fill --mib N [--timeout SEC]
 *
 * Every command prints one JSON object on stdout. Errors are JSON too,
 * {"error": "<errno name>", "errno": n, "message": "..."}, with exit status 2
 * for bad arguments and 1 for everything else.
 *
 * `hold` forks a holder that leaves the caller's session (setsid, stdio on
 * /dev/null), so the buffer outlives the SSH command that created it. The
 * holder maps N MiB of anonymous memory (THP off, so 4 KiB pages stay 4 KiB
 * pages and khugepaged never collapses and moves them), mlocks it when asked,
 * writes the pattern (which touches every page), reads each page's guest
 * physical address from /proc/self/pagemap, and only then answers the `hold`
 * command through a pipe. It serves later commands on a unix socket in DIR
 * (DIR/sock), one request line in, one JSON reply out, so no command ever
 * sleeps: each waits on a file descriptor with a deadline.
 *
 * GPAs are not fixed by mlock: it keeps pages resident, but compaction may still
 * migrate them while vm.compact_unevictable_allowed is 1 (the default; a forced
 * compaction moved 8 of 16384 locked pages in a 6.12 guest). `gpas` reports what moved
 * since `hold`; `verify` judges against the hold-time GPAs, which are what the host
 * was told. Set the sysctl to 0 when the host acts on those GPAs.
 *
 * `fill` makes the guest use N MiB once and frees them (a balloon or an unplug then
 * has backed pages to give back): no holder, no pattern, no GPAs, one command. It
 * writes one word per page; the kernel zeroes each page as it faults it in, which is
 * what backs it on the host, and under TCG that zeroing is most of the cost (THP, 512x
 * fewer faults, was no faster). Measured in one 512 MiB TCG guest, 340 MiB: `hold` +
 * `release` 3.8 s, `fill` 3.0 s.
 *
 * The pattern: the 64-bit word at index w of page p is splitmix64 of
 * (seed ^ (p << 20) ^ w). The map is injective, so every word of a buffer is
 * different: a page moved, swapped or zeroed never matches by accident.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define EXIT_FAIL 1
#define EXIT_USAGE 2

#define MAX_MIB (1u << 20)         /* 1 TiB: anything larger is a typo */
#define MAX_RANGES 256
#define DEFAULT_MAX_LIST 64
#define DEFAULT_TIMEOUT_S 120.0
#define REQUEST_MAX 8192
#define REQUEST_READ_TIMEOUT_MS 10000

#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_PFN_MASK ((1ULL << 55) - 1)

/* --- output buffer and JSON ------------------------------------------------- */

struct buf {
	char *data;
	size_t len;
	size_t cap;
};

static void buf_reserve(struct buf *b, size_t more)
{
	if (b->len + more + 1 <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + more + 1)
		cap *= 2;
	char *data = realloc(b->data, cap);
	if (!data) {
		/* Nothing sensible is left to do without memory: say so and stop. */
		static const char msg[] =
			"{\"error\":\"ENOMEM\",\"errno\":12,\"message\":\"out of memory\"}\n";
		(void)!write(STDOUT_FILENO, msg, sizeof(msg) - 1);
		_exit(EXIT_FAIL);
	}
	b->data = data;
	b->cap = cap;
}

__attribute__((format(printf, 2, 3)))
static void buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	buf_reserve(b, (size_t)n);
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static void buf_json_string(struct buf *b, const char *s)
{
	buf_printf(b, "\"");
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			buf_printf(b, "\\%c", *p);
		else if (*p < 0x20)
			buf_printf(b, "\\u%04x", *p);
		else
			buf_printf(b, "%c", *p);
	}
	buf_printf(b, "\"");
}

static const char *errno_name(int err)
{
	const char *name = strerrorname_np(err);
	return name ? name : "EUNKNOWN";
}

/* {"error":"EINVAL","errno":22,"message":"..."} */
__attribute__((format(printf, 3, 4)))
static void buf_error(struct buf *b, int err, const char *fmt, ...)
{
	char message[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	buf_printf(b, "{\"error\":\"%s\",\"errno\":%d,\"message\":", errno_name(err), err);
	buf_json_string(b, message);
	buf_printf(b, "}");
}

static void write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return; /* the reader is gone; nothing else can report it */
		data += n;
		len -= (size_t)n;
	}
}

static void print_and_exit(struct buf *b, int status)
{
	buf_printf(b, "\n");
	write_all(STDOUT_FILENO, b->data, b->len);
	exit(status);
}

__attribute__((noreturn, format(printf, 3, 4)))
static void die(int status, int err, const char *fmt, ...)
{
	char message[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	struct buf b = {0};
	buf_error(&b, err, "%s", message);
	print_and_exit(&b, status);
	exit(status);
}

#define usage_error(...) die(EXIT_USAGE, EINVAL, __VA_ARGS__)

/* --- time ---------------------------------------------------------------------- */

static double mono_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Milliseconds left until `deadline` for poll(), at least 0. */
static int ms_left(double deadline)
{
	double left = deadline - mono_s();
	if (left <= 0)
		return 0;
	return left > 1e6 ? 1000000000 : (int)(left * 1000.0) + 1;
}

/* --- the pattern ------------------------------------------------------------------ */

static inline uint64_t pattern_word(uint64_t seed, uint64_t page, uint64_t word)
{
	uint64_t z = (seed ^ (page << 20) ^ word) + 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* --- arguments --------------------------------------------------------------------- */

struct range {
	uint64_t start;
	uint64_t len;
};

struct options {
	const char *command;
	const char *state;
	uint64_t mib;
	bool have_mib;
	uint64_t seed;
	bool have_seed;
	bool lock;
	double timeout;
	uint64_t max_list;
	struct range ranges[MAX_RANGES];
	size_t nranges;
};

static uint64_t parse_u64(const char *text, const char *what)
{
	if (!text || !*text || *text == '-')
		usage_error("%s: %s is not a non-negative number", what, text ? text : "(missing)");
	errno = 0;
	char *end = NULL;
	unsigned long long value = strtoull(text, &end, 0);
	if (errno || !end || *end)
		usage_error("%s: %s is not a number (decimal or 0x hex)", what, text);
	return (uint64_t)value;
}

/*
 * Parse "START:LEN[,START:LEN...]" into o->ranges. Returns 0, or -1 with a message in
 * `why`: the client turns that into a usage error, the holder into an error reply
 * (a bad request must never end the holder).
 */
static int parse_ranges(struct options *o, const char *text, long page_size, char *why,
			size_t why_len)
{
	const char *item = text;
	while (*item) {
		const char *end = strchr(item, ',');
		size_t len = end ? (size_t)(end - item) : strlen(item);
		char one[128];
		if (len == 0 || len >= sizeof(one)) {
			snprintf(why, why_len, "bad range list %s: write START:LENGTH[,...]", text);
			return -1;
		}
		memcpy(one, item, len);
		one[len] = '\0';
		char *colon = strchr(one, ':');
		char *stop1 = NULL, *stop2 = NULL;
		errno = 0;
		uint64_t start = colon ? strtoull(one, &stop1, 0) : 0;
		uint64_t size = colon ? strtoull(colon + 1, &stop2, 0) : 0;
		if (!colon || errno || one[0] == '-' || colon[1] == '-' || stop1 != colon ||
		    stop2 == colon + 1 || *stop2) {
			snprintf(why, why_len, "range %s: write START:LENGTH (bytes, decimal or 0x hex)",
				 one);
			return -1;
		}
		if (size == 0 || start % (uint64_t)page_size || size % (uint64_t)page_size) {
			snprintf(why, why_len, "range 0x%" PRIx64 ":0x%" PRIx64 " must be non-empty "
				 "and aligned to the page size (%ld)", start, size, page_size);
			return -1;
		}
		if (start + size < start) {
			snprintf(why, why_len, "range 0x%" PRIx64 ":0x%" PRIx64 " wraps around",
				 start, size);
			return -1;
		}
		if (o->nranges == MAX_RANGES) {
			snprintf(why, why_len, "more than %d ranges", MAX_RANGES);
			return -1;
		}
		o->ranges[o->nranges++] = (struct range){start, size};
		item = end ? end + 1 : item + len;
	}
	return 0;
}

static void parse_options(struct options *o, int argc, char **argv, long page_size)
{
	memset(o, 0, sizeof(*o));
	o->timeout = DEFAULT_TIMEOUT_S;
	o->max_list = DEFAULT_MAX_LIST;
	if (argc < 2)
		usage_error("usage: cvmlab-mem hold|verify|gpas|release|fill [options]");
	o->command = argv[1];
	bool is_hold = !strcmp(o->command, "hold");
	bool is_verify = !strcmp(o->command, "verify");
	bool is_fill = !strcmp(o->command, "fill");
	if (!is_hold && !is_verify && !is_fill && strcmp(o->command, "gpas") &&
	    strcmp(o->command, "release"))
		usage_error("unknown command %s: use hold, verify, gpas, release or fill",
			    o->command);
	for (int i = 2; i < argc; i++) {
		const char *arg = argv[i];
		const char *value = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(arg, "--lock") && is_hold) {
			o->lock = true;
			continue;
		}
		if (!value)
			usage_error("%s needs a value (or is not an option of %s)", arg, o->command);
		if (!strcmp(arg, "--state")) {
			o->state = value;
		} else if (!strcmp(arg, "--timeout")) {
			o->timeout = (double)parse_u64(value, "--timeout");
			if (o->timeout <= 0)
				usage_error("--timeout must be at least 1 second");
		} else if (!strcmp(arg, "--mib") && (is_hold || is_fill)) {
			o->mib = parse_u64(value, "--mib");
			o->have_mib = true;
		} else if (!strcmp(arg, "--seed") && is_hold) {
			o->seed = parse_u64(value, "--seed");
			o->have_seed = true;
		} else if (!strcmp(arg, "--expect-zero-gpa-ranges") && is_verify) {
			char why[256];
			if (parse_ranges(o, value, page_size, why, sizeof(why)) < 0)
				usage_error("%s", why);
		} else if (!strcmp(arg, "--max-list") && is_verify) {
			o->max_list = parse_u64(value, "--max-list");
		} else {
			usage_error("unknown option %s for %s", arg, o->command);
		}
		i++;
	}
	if (is_fill) {
		if (!o->have_mib)
			usage_error("fill needs --mib N");
		if (o->mib == 0 || o->mib > MAX_MIB)
			usage_error("--mib %" PRIu64 " is out of range 1..%u", o->mib, MAX_MIB);
		return;
	}
	if (!o->state)
		usage_error("%s needs --state DIR", o->command);
	if (is_hold) {
		if (!o->have_mib || !o->have_seed)
			usage_error("hold needs --mib N and --seed S");
		if (o->mib == 0 || o->mib > MAX_MIB)
			usage_error("--mib %" PRIu64 " is out of range 1..%u", o->mib, MAX_MIB);
	}
}

/* --- state directory --------------------------------------------------------------- */

struct paths {
	char dir[PATH_MAX];
	char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char pid[PATH_MAX];
	char report[PATH_MAX];
};

static void make_paths(struct paths *p, const char *dir)
{
	if (snprintf(p->dir, sizeof(p->dir), "%s", dir) >= (int)sizeof(p->dir) ||
	    snprintf(p->pid, sizeof(p->pid), "%s/pid", dir) >= (int)sizeof(p->pid) ||
	    snprintf(p->report, sizeof(p->report), "%s/hold.json", dir) >= (int)sizeof(p->report))
		usage_error("--state %s is too long", dir);
	if (snprintf(p->sock, sizeof(p->sock), "%s/sock", dir) >= (int)sizeof(p->sock))
		usage_error("--state %s is too long for a unix socket path (max %zu bytes)", dir,
			    sizeof(p->sock) - 6);
}

/* The holder's pid from DIR/pid, or 0 when there is none. */
static pid_t read_pid(const struct paths *p)
{
	FILE *f = fopen(p->pid, "r");
	if (!f)
		return 0;
	long pid = 0;
	if (fscanf(f, "%ld", &pid) != 1)
		pid = 0;
	fclose(f);
	return pid > 0 ? (pid_t)pid : 0;
}

/* True when `pid` has exited (or never existed); a zombie counts as exited. */
static bool process_exited(pid_t pid)
{
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0)
		return errno == ESRCH;
	struct pollfd pfd = {.fd = pidfd, .events = POLLIN};
	bool exited = poll(&pfd, 1, 0) > 0;
	close(pidfd);
	return exited;
}

/* True when a holder answers on DIR/sock: a pid file alone can be stale or reused. */
static bool holder_listening(const struct paths *p)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return false;
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	memcpy(addr.sun_path, p->sock, strlen(p->sock) + 1);
	bool listening = connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0;
	close(fd); /* the holder sees an empty request and drops it */
	return listening;
}

static void remove_state_files(const struct paths *p)
{
	unlink(p->sock);
	unlink(p->report);
	unlink(p->pid);
}

/* Write `data` to `path` through a temporary file and rename, so readers see all or nothing. */
static int write_file_atomic(const char *path, const char *data, size_t len)
{
	char tmp[PATH_MAX + 8];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	size_t done = 0;
	while (done < len) {
		ssize_t n = write(fd, data + done, len - done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			int err = errno;
			close(fd);
			unlink(tmp);
			errno = err;
			return -1;
		}
		done += (size_t)n;
	}
	if (close(fd) < 0 || rename(tmp, path) < 0) {
		int err = errno;
		unlink(tmp);
		errno = err;
		return -1;
	}
	return 0;
}

/* --- the holder ------------------------------------------------------------------------ */

struct holder {
	struct paths paths;
	uint64_t seed;
	size_t pages;
	long page_size;
	bool locked;
	unsigned char *base;
	uint64_t *gpas; /* at hold time: what the host was told; UINT64_MAX = not present */
	double fill_s;
};

static int read_gpas(const struct holder *h, uint64_t *out, int *err)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		*err = errno;
		return -1;
	}
	const size_t chunk = 4096;
	uint64_t entries[4096];
	uintptr_t first = (uintptr_t)h->base / (uintptr_t)h->page_size;
	bool any_pfn = false;
	for (size_t done = 0; done < h->pages;) {
		size_t n = h->pages - done < chunk ? h->pages - done : chunk;
		ssize_t got = pread(fd, entries, n * sizeof(uint64_t),
				    (off_t)((first + done) * sizeof(uint64_t)));
		if (got != (ssize_t)(n * sizeof(uint64_t))) {
			*err = got < 0 ? errno : EIO;
			close(fd);
			return -1;
		}
		for (size_t i = 0; i < n; i++) {
			uint64_t e = entries[i];
			uint64_t pfn = e & PAGEMAP_PFN_MASK;
			if (!(e & PAGEMAP_PRESENT)) {
				out[done + i] = UINT64_MAX;
				continue;
			}
			any_pfn |= pfn != 0;
			out[done + i] = pfn * (uint64_t)h->page_size;
		}
		done += n;
	}
	close(fd);
	if (!any_pfn) {
		/* The kernel hides PFNs (reports 0) from readers without CAP_SYS_ADMIN. */
		*err = EPERM;
		return -1;
	}
	return 0;
}

static void buf_gpa_list(struct buf *b, const uint64_t *gpas, size_t n)
{
	buf_printf(b, "[");
	for (size_t i = 0; i < n; i++) {
		if (gpas[i] == UINT64_MAX)
			buf_printf(b, "%snull", i ? "," : "");
		else
			buf_printf(b, "%s%" PRIu64, i ? "," : "", gpas[i]);
	}
	buf_printf(b, "]");
}

static void hold_report(const struct holder *h, struct buf *b)
{
	buf_printf(b, "{\"pid\":%ld,\"pages\":%zu,\"page_size\":%ld,\"mib\":%zu,"
		   "\"seed\":%" PRIu64 ",\"locked\":%s,\"thp\":\"off\",\"addr\":\"%p\","
		   "\"fill_ms\":%.1f,\"state\":",
		   (long)getpid(), h->pages, h->page_size,
		   h->pages * (size_t)h->page_size >> 20, h->seed, h->locked ? "true" : "false",
		   (void *)h->base, h->fill_s * 1000.0);
	buf_json_string(b, h->paths.dir);
	buf_printf(b, ",\"gpas\":");
	buf_gpa_list(b, h->gpas, h->pages);
	buf_printf(b, "}");
}

static void fill(struct holder *h)
{
	double t0 = mono_s();
	size_t words = (size_t)h->page_size / sizeof(uint64_t);
	for (size_t page = 0; page < h->pages; page++) {
		uint64_t *w = (uint64_t *)(h->base + page * (size_t)h->page_size);
		for (size_t i = 0; i < words; i++)
			w[i] = pattern_word(h->seed, page, i);
	}
	h->fill_s = mono_s() - t0;
}

static bool page_is_zero(const unsigned char *p, size_t len, size_t *first_nonzero)
{
	const uint64_t *w = (const uint64_t *)p;
	for (size_t i = 0; i < len / sizeof(uint64_t); i++) {
		if (w[i]) {
			size_t byte = i * sizeof(uint64_t);
			while (!p[byte])
				byte++;
			*first_nonzero = byte;
			return false;
		}
	}
	return true;
}

static bool in_ranges(uint64_t gpa, const struct range *ranges, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (gpa >= ranges[i].start && gpa - ranges[i].start < ranges[i].len)
			return true;
	return false;
}

/*
 * Check every page. Pages whose hold-time GPA is in `ranges` must read zero
 * (the host punched them); all others must carry the pattern. Kinds of bad page:
 * "zero" (a pattern page reads all zero), "corrupt" (it reads something else),
 * "not_zero" (a page the host punched still holds data: the punch freed nothing).
 */
static void verify(const struct holder *h, const struct range *ranges, size_t nranges,
		   uint64_t max_list, struct buf *b)
{
	double t0 = mono_s();
	size_t ps = (size_t)h->page_size;
	size_t words = ps / sizeof(uint64_t);
	size_t bad_pages = 0, zero_count = 0, expected_zero = 0, expected_zero_ok = 0;
	long long first_bad = -1;
	struct buf bad = {0}, zeros = {0};
	size_t listed_bad = 0, listed_zero = 0;

	for (size_t page = 0; page < h->pages; page++) {
		const unsigned char *p = h->base + page * ps;
		const uint64_t *w = (const uint64_t *)p;
		bool expect_zero = h->gpas[page] != UINT64_MAX &&
				   in_ranges(h->gpas[page], ranges, nranges);
		const char *kind = NULL;
		size_t offset = 0;
		size_t nonzero_at = 0;
		bool zero = page_is_zero(p, ps, &nonzero_at);
		if (zero) {
			zero_count++;
			if (listed_zero < max_list)
				buf_printf(&zeros, "%s%zu", listed_zero++ ? "," : "", page);
		}
		if (expect_zero) {
			expected_zero++;
			if (zero)
				expected_zero_ok++;
			else {
				kind = "not_zero";
				offset = nonzero_at;
			}
		} else {
			for (size_t i = 0; i < words; i++) {
				uint64_t want = pattern_word(h->seed, page, i);
				if (w[i] != want) {
					const unsigned char *got = (const unsigned char *)&w[i];
					const unsigned char *exp = (const unsigned char *)&want;
					size_t byte = 0;
					while (got[byte] == exp[byte])
						byte++;
					offset = i * sizeof(uint64_t) + byte;
					kind = zero ? "zero" : "corrupt";
					break;
				}
			}
		}
		if (!kind)
			continue;
		bad_pages++;
		if (first_bad < 0)
			first_bad = (long long)(page * ps + offset);
		if (listed_bad < max_list) {
			buf_printf(&bad, "%s{\"page\":%zu,\"gpa\":", listed_bad++ ? "," : "", page);
			if (h->gpas[page] == UINT64_MAX)
				buf_printf(&bad, "null");
			else
				buf_printf(&bad, "%" PRIu64, h->gpas[page]);
			buf_printf(&bad, ",\"kind\":\"%s\",\"offset\":%zu}", kind, offset);
		}
	}
	buf_printf(b, "{\"pages\":%zu,\"bad_pages\":%zu,\"first_bad_offset\":", h->pages, bad_pages);
	if (first_bad < 0)
		buf_printf(b, "null");
	else
		buf_printf(b, "%lld", first_bad);
	buf_printf(b, ",\"zero_page_count\":%zu,\"zero_pages\":[%s],"
		   "\"expected_zero_pages\":%zu,\"expected_zero_ok\":%zu,"
		   "\"bad\":[%s],\"bad_truncated\":%s,\"verify_ms\":%.1f}",
		   zero_count, zeros.data ? zeros.data : "", expected_zero, expected_zero_ok,
		   bad.data ? bad.data : "", bad_pages > listed_bad ? "true" : "false",
		   (mono_s() - t0) * 1000.0);
	free(bad.data);
	free(zeros.data);
}

static void gpas_now(const struct holder *h, struct buf *b)
{
	uint64_t *now = calloc(h->pages, sizeof(uint64_t));
	int err = 0;
	if (!now) {
		buf_error(b, ENOMEM, "out of memory");
		return;
	}
	if (read_gpas(h, now, &err) < 0) {
		buf_error(b, err, "cannot read /proc/self/pagemap: %s", strerror(err));
		free(now);
		return;
	}
	size_t moved = 0, absent = 0;
	struct buf list = {0};
	for (size_t i = 0; i < h->pages; i++) {
		if (now[i] == UINT64_MAX)
			absent++;
		if (now[i] != h->gpas[i] && moved++ < DEFAULT_MAX_LIST)
			buf_printf(&list, "%s%zu", moved > 1 ? "," : "", i);
	}
	buf_printf(b, "{\"pages\":%zu,\"moved\":%zu,\"moved_pages\":[%s],\"not_present\":%zu,"
		   "\"gpas\":", h->pages, moved, list.data ? list.data : "", absent);
	buf_gpa_list(b, now, h->pages);
	buf_printf(b, "}");
	free(list.data);
	free(now);
}

/* Read one request line (up to '\n' or EOF) from a client, waiting at most a few seconds. */
static int read_request(int fd, char *line, size_t cap)
{
	size_t len = 0;
	double deadline = mono_s() + REQUEST_READ_TIMEOUT_MS / 1000.0;
	while (len + 1 < cap) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		int ready = poll(&pfd, 1, ms_left(deadline));
		if (ready <= 0)
			return -1;
		ssize_t n = read(fd, line + len, cap - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
		if (memchr(line, '\n', len))
			break;
	}
	line[len] = '\0';
	char *nl = strchr(line, '\n');
	if (nl)
		*nl = '\0';
	return 0;
}

/* Serve requests until `release`. A reply starts with '0' (ok) or '1' (error), then JSON. */
static void serve(struct holder *h, int listener)
{
	for (;;) {
		int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0)
			continue; /* EINTR, or a client that vanished before accept */
		char line[REQUEST_MAX];
		struct buf reply = {0};
		bool release = false;
		/* An empty request is a liveness probe (holder_listening): nothing to answer. */
		if (read_request(conn, line, sizeof(line)) < 0 || !line[0]) {
			close(conn);
			continue;
		}
		char *args = strchr(line, ' ');
		if (args)
			*args++ = '\0';
		if (!strcmp(line, "verify")) {
			struct options o;
			memset(&o, 0, sizeof(o));
			o.max_list = DEFAULT_MAX_LIST;
			/* Arguments were checked by the client: "<max_list> [ranges]". */
			char *ranges = NULL;
			if (args) {
				o.max_list = strtoull(args, &ranges, 10);
				while (ranges && *ranges == ' ')
					ranges++;
			}
			char why[256];
			if (ranges && *ranges &&
			    parse_ranges(&o, ranges, h->page_size, why, sizeof(why)) < 0) {
				buf_printf(&reply, "1");
				buf_error(&reply, EINVAL, "%s", why);
			} else {
				buf_printf(&reply, "0");
				verify(h, o.ranges, o.nranges, o.max_list, &reply);
			}
		} else if (!strcmp(line, "gpas")) {
			buf_printf(&reply, "0");
			gpas_now(h, &reply);
		} else if (!strcmp(line, "release")) {
			buf_printf(&reply, "0{\"released\":true,\"pid\":%ld,\"pages\":%zu}",
				   (long)getpid(), h->pages);
			release = true;
		} else {
			buf_printf(&reply, "1");
			buf_error(&reply, EINVAL, "unknown request %s", line);
		}
		if (reply.len > 1 && reply.data[1] == '{' && !strncmp(reply.data + 1, "{\"error\"", 8))
			reply.data[0] = '1';
		if (release) {
			/* Free everything before answering, so "released" means released. */
			munmap(h->base, h->pages * (size_t)h->page_size);
			close(listener);
			remove_state_files(&h->paths);
		}
		write_all(conn, reply.data, reply.len);
		close(conn);
		free(reply.data);
		if (release)
			_exit(0);
	}
}

/* Runs in the daemonised holder; reports through `report_fd` and never returns. */
__attribute__((noreturn))
static void become_holder(const struct options *o, const struct paths *paths, long page_size,
			  int report_fd)
{
	struct holder h = {.paths = *paths, .seed = o->seed, .page_size = page_size};
	struct buf out = {0};
	int err = 0;
	const char *step = "";
	h.pages = (size_t)(o->mib << 20) / (size_t)page_size;
	size_t bytes = h.pages * (size_t)page_size;

	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	umask(077);

	int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	memcpy(addr.sun_path, paths->sock, strlen(paths->sock) + 1);
	unlink(paths->sock); /* stale: the caller checked that no holder is alive */
	if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(listener, 8) < 0) {
		err = errno;
		step = "cannot listen on the state socket";
		goto fail;
	}
	h.gpas = calloc(h.pages, sizeof(uint64_t));
	if (!h.gpas) {
		err = ENOMEM;
		step = "cannot allocate the GPA table";
		goto fail;
	}
	h.base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (h.base == MAP_FAILED) {
		err = errno;
		step = "mmap of the buffer failed";
		goto fail;
	}
	/* 4 KiB pages only: a THP would make 512 GPAs move together when khugepaged works. */
	if (madvise(h.base, bytes, MADV_NOHUGEPAGE) < 0 && errno != EINVAL) {
		err = errno;
		step = "madvise(MADV_NOHUGEPAGE) failed";
		goto fail;
	}
	if (o->lock) {
		if (mlock(h.base, bytes) < 0) {
			err = errno;
			step = "mlock of the buffer failed";
			goto fail;
		}
		h.locked = true;
	}
	fill(&h);
	if (read_gpas(&h, h.gpas, &err) < 0) {
		step = "cannot read guest physical addresses from /proc/self/pagemap";
		goto fail;
	}
	hold_report(&h, &out);
	if (write_file_atomic(paths->report, out.data, out.len) < 0) {
		err = errno;
		step = "cannot write the hold report";
		goto fail;
	}
	char pidtext[32];
	int pidlen = snprintf(pidtext, sizeof(pidtext), "%ld\n", (long)getpid());
	if (write_file_atomic(paths->pid, pidtext, (size_t)pidlen) < 0) {
		err = errno;
		step = "cannot write the pid file";
		goto fail;
	}
	write_all(report_fd, out.data, out.len);
	close(report_fd);
	free(out.data);
	serve(&h, listener);
	_exit(0);

fail:
	out.len = 0;
	buf_error(&out, err, "%s (%s): %s", step, paths->dir, strerror(err));
	write_all(report_fd, out.data, out.len);
	remove_state_files(paths);
	_exit(EXIT_FAIL);
}

static void cmd_hold(const struct options *o, long page_size)
{
	struct paths paths;
	make_paths(&paths, o->state);
	if (mkdir(paths.dir, 0700) < 0 && errno != EEXIST)
		die(EXIT_FAIL, errno, "cannot create state directory %s: %s", paths.dir,
		    strerror(errno));
	if (holder_listening(&paths))
		die(EXIT_FAIL, EBUSY, "holder %ld already holds memory for %s: release it first",
		    (long)read_pid(&paths), paths.dir);

	int pipefd[2];
	if (pipe2(pipefd, O_CLOEXEC) < 0)
		die(EXIT_FAIL, errno, "pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t child = fork();
	if (child < 0)
		die(EXIT_FAIL, errno, "fork: %s", strerror(errno));
	if (child == 0) {
		/* Leave the caller's session and stdio, then fork again so the holder is
		 * not a session leader and is re-parented to init. */
		close(pipefd[0]);
		if (setsid() < 0)
			_exit(EXIT_FAIL);
		pid_t holder = fork();
		if (holder != 0)
			_exit(holder < 0 ? EXIT_FAIL : 0);
		int null = open("/dev/null", O_RDWR);
		if (null >= 0) {
			dup2(null, STDIN_FILENO);
			dup2(null, STDOUT_FILENO);
			dup2(null, STDERR_FILENO);
			if (null > STDERR_FILENO)
				close(null);
		}
		/* Drop every other inherited fd (an SSH session's, say) but the report pipe. */
		int keep = pipefd[1];
		if (keep > 3)
			syscall(SYS_close_range, 3, keep - 1, 0);
		syscall(SYS_close_range, keep + 1, ~0U, 0);
		if (chdir("/") < 0)
			_exit(EXIT_FAIL);
		become_holder(o, &paths, page_size, keep);
	}
	close(pipefd[1]);
	int status = 0;
	waitpid(child, &status, 0); /* the intermediate child exits at once */

	/* Wait for the holder's report: its pipe end closes when it is ready or gone. */
	struct buf got = {0};
	double deadline = mono_s() + o->timeout;
	for (;;) {
		struct pollfd pfd = {.fd = pipefd[0], .events = POLLIN};
		int ready = poll(&pfd, 1, ms_left(deadline));
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready == 0)
			die(EXIT_FAIL, ETIMEDOUT, "the holder did not report within %.0f s "
			    "(it keeps running; release it with: cvmlab-mem release --state %s)",
			    o->timeout, paths.dir);
		buf_reserve(&got, 65536);
		ssize_t n = read(pipefd[0], got.data + got.len, got.cap - got.len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got.len += (size_t)n;
	}
	close(pipefd[0]);
	if (got.len == 0)
		die(EXIT_FAIL, ECHILD, "the holder exited without a report (killed? out of memory?)");
	got.data[got.len] = '\0';
	print_and_exit(&got, strncmp(got.data, "{\"error\"", 8) ? 0 : EXIT_FAIL);
}

/* --- clients ---------------------------------------------------------------------------- */

/* Send one request to the holder and return its reply (status byte stripped) in `out`. */
static int request(const struct paths *paths, const char *line, double deadline, struct buf *out)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die(EXIT_FAIL, errno, "socket: %s", strerror(errno));
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	memcpy(addr.sun_path, paths->sock, strlen(paths->sock) + 1);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		int err = errno;
		if (err == ENOENT || err == ECONNREFUSED)
			die(EXIT_FAIL, err, "no holder serves %s (run hold first): %s", paths->dir,
			    strerror(err));
		die(EXIT_FAIL, err, "cannot reach the holder at %s: %s", paths->sock, strerror(err));
	}
	write_all(fd, line, strlen(line));
	write_all(fd, "\n", 1);
	shutdown(fd, SHUT_WR);
	for (;;) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		int ready = poll(&pfd, 1, ms_left(deadline));
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready == 0)
			die(EXIT_FAIL, ETIMEDOUT, "the holder did not answer %s in time", line);
		buf_reserve(out, 65536);
		ssize_t n = read(fd, out->data + out->len, out->cap - out->len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die(EXIT_FAIL, errno, "reading the holder's reply: %s", strerror(errno));
		if (n == 0)
			break;
		out->len += (size_t)n;
	}
	close(fd);
	if (out->len == 0)
		die(EXIT_FAIL, EPIPE, "the holder closed the connection without a reply");
	out->data[out->len] = '\0';
	int status = out->data[0] == '0' ? 0 : EXIT_FAIL;
	memmove(out->data, out->data + 1, out->len); /* drop the status byte, keep the NUL */
	out->len--;
	return status;
}

static void cmd_verify(const struct options *o)
{
	struct paths paths;
	make_paths(&paths, o->state);
	struct buf line = {0};
	buf_printf(&line, "verify %" PRIu64 " ", o->max_list);
	for (size_t i = 0; i < o->nranges; i++)
		buf_printf(&line, "%s%" PRIu64 ":%" PRIu64, i ? "," : "", o->ranges[i].start,
			   o->ranges[i].len);
	if (line.len + 1 > REQUEST_MAX)
		usage_error("too many ranges for one request");
	struct buf out = {0};
	int status = request(&paths, line.data, mono_s() + o->timeout, &out);
	print_and_exit(&out, status);
}

static void cmd_gpas(const struct options *o)
{
	struct paths paths;
	make_paths(&paths, o->state);
	struct buf out = {0};
	int status = request(&paths, "gpas", mono_s() + o->timeout, &out);
	print_and_exit(&out, status);
}

static void cmd_release(const struct options *o)
{
	struct paths paths;
	make_paths(&paths, o->state);
	double start = mono_s();
	double deadline = start + o->timeout;
	pid_t pid = read_pid(&paths);
	if (!pid)
		die(EXIT_FAIL, ENOENT, "no holder for %s (nothing to release)", paths.dir);
	/* Open the pidfd before asking, so the exit cannot be missed or confused with a reuse. */
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if ((pidfd < 0 && errno == ESRCH) || process_exited(pid) || !holder_listening(&paths)) {
		remove_state_files(&paths);
		die(EXIT_FAIL, ESRCH, "holder %ld of %s is gone (removed its stale state)",
		    (long)pid, paths.dir);
	}
	if (pidfd < 0)
		die(EXIT_FAIL, errno, "pidfd_open(%ld): %s", (long)pid, strerror(errno));
	struct buf out = {0};
	int status = request(&paths, "release", deadline, &out);
	if (status != 0)
		print_and_exit(&out, status);
	for (;;) {
		struct pollfd pfd = {.fd = pidfd, .events = POLLIN};
		int ready = poll(&pfd, 1, ms_left(deadline));
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready == 0)
			die(EXIT_FAIL, ETIMEDOUT, "holder %ld answered release but did not exit in "
			    "%.0f s", (long)pid, o->timeout);
		break;
	}
	close(pidfd);
	struct buf done = {0};
	buf_printf(&done, "{\"released\":true,\"pid\":%ld,\"wait_ms\":%.1f}", (long)pid,
		   (mono_s() - start) * 1000.0);
	print_and_exit(&done, 0);
}

static void fill_timed_out(int sig)
{
	static const char message[] = "{\"error\":\"ETIMEDOUT\",\"errno\":110,"
				      "\"message\":\"fill did not finish before --timeout\"}\n";
	(void)sig;
	write_all(STDOUT_FILENO, message, sizeof(message) - 1);
	_exit(EXIT_FAIL);
}

static void cmd_fill(const struct options *o, long page_size)
{
	size_t bytes = (size_t)(o->mib << 20);
	signal(SIGALRM, fill_timed_out);
	alarm((unsigned)o->timeout);
	double start = mono_s();
	char *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		die(EXIT_FAIL, errno, "mmap of %" PRIu64 " MiB failed: %s", o->mib, strerror(errno));
	size_t pages = bytes / (size_t)page_size;
	for (size_t page = 0; page < pages; page++)
		*(volatile uint64_t *)(base + page * (size_t)page_size) = page | (1ULL << 63);
	double fill_s = mono_s() - start;
	munmap(base, bytes);
	alarm(0);
	struct buf out = {0};
	buf_printf(&out, "{\"mib\":%" PRIu64 ",\"pages\":%zu,\"fill_ms\":%.1f}", o->mib, pages,
		   fill_s * 1000.0);
	print_and_exit(&out, 0);
}

int main(int argc, char **argv)
{
	long page_size = sysconf(_SC_PAGESIZE);
	struct options o;
	parse_options(&o, argc, argv, page_size);
	if (!strcmp(o.command, "hold"))
		cmd_hold(&o, page_size);
	else if (!strcmp(o.command, "verify"))
		cmd_verify(&o);
	else if (!strcmp(o.command, "gpas"))
		cmd_gpas(&o);
	else if (!strcmp(o.command, "fill"))
		cmd_fill(&o, page_size);
	else
		cmd_release(&o);
	return 0;
}
