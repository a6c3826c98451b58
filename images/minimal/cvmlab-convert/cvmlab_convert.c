// SPDX-License-Identifier: GPL-2.0
/*
 * cvmlab_convert - drive private<->shared memory conversions inside a guest.
 *
 * Control interface (debugfs; the cvmlab image's /init mounts it):
 *
 *   /sys/kernel/debug/cvmlab_convert/run      write-only
 *       "pages=N seed=S loops=L chunk=C" (any order; each key optional)
 *       Allocates N pages in chunks of C physically contiguous pages, fills
 *       them from S, then L times converts every chunk to shared with
 *       set_memory_decrypted() and back to private with
 *       set_memory_encrypted(), checking contents after each call. The
 *       write returns when the run is done: the byte count on a completed
 *       run (even one that counted failures), a negative errno when the run
 *       could not be carried out (bad input, no memory, interrupted).
 *       Defaults: pages=16 seed=0 loops=1 chunk=1.
 *       fail_call=K (testing only, default 0 = off): the K-th conversion call
 *       of the run (decrypt and encrypt calls counted together, from 1) is
 *       not made and reports -EIO instead, so that the failure path (count,
 *       leak, skip the chunk from then on) runs where calls cannot fail.
 *       Limits: 1 <= pages <= 65536, 1 <= chunk <= min(pages, 1024),
 *       1 <= loops <= 1000000. The last chunk is smaller when C does not
 *       divide N.
 *
 *   /sys/kernel/debug/cvmlab_convert/result   read-only
 *       One JSON object describing the last run (or the last refused
 *       request): "error" is 0 or a negative errno, "message" says why.
 *
 * Content semantics checked (what the kernel does, with sources):
 *
 * - Not a confidential guest (!cc_platform_has(CC_ATTR_MEM_ENCRYPT)):
 *   __set_memory_enc_dec() in arch/x86/mm/pat/set_memory.c returns 0
 *   without touching page tables, so both calls are no-ops and the
 *   contents are preserved across them. The module checks that the fill
 *   written before a conversion is still there after it ("preserved").
 *
 * - TDX guest: the private->shared call ends in tdx_enc_status_changed()
 *   (arch/x86/coco/tdx/tdx.c) issuing TDG.VP.VMCALL<MapGPA> for the
 *   shared alias; the shared GPA is backed by different host memory than
 *   the private page (in QEMU, kvm_convert_memory() punches the private
 *   page out of guest_memfd), so the old contents are gone. The
 *   shared->private call does MapGPA and then tdx_accept_memory() ("shared
 *   ->private conversion requires memory to be accepted before use"), and
 *   TDG.MEM.PAGE.ACCEPT initialises the page. Documentation/arch/x86/tdx.rst
 *   ("Shared Memory Conversions") promises nothing about contents.
 *
 * - SEV-SNP guest: amd_enc_status_change_prepare() calls
 *   snp_set_memory_shared() ("make sure to invalidate the memory before
 *   encryption attribute is cleared": PVALIDATE rescind, then a Page State
 *   Change to shared), and amd_enc_status_change_finish() calls
 *   snp_set_memory_private() (PSC to private, then PVALIDATE)
 *   (arch/x86/mm/mem_encrypt_amd.c). Private and shared halves are
 *   different host pages (guest_memfd vs. the shared backend), so contents
 *   do not carry over. On legacy SEV the same page is read without the
 *   C-bit: the guest sees ciphertext.
 *
 *   So on every confidential platform the contents after either call are
 *   undefined: callers that need known contents write them (kernel/dma/
 *   direct.c clears a buffer after dma_set_decrypted()). The module then
 *   does not check old contents; it re-fills the page after each call and
 *   checks that the fill reads back ("roundtrip"), which proves the new
 *   mapping is usable and coherent. On a plain guest it checks both.
 *
 * Failures: "In CoCo VMs it is possible for the untrusted host to cause
 * set_memory_encrypted() or set_memory_decrypted() to fail such that an
 * error is returned and the resulting memory is shared" (Rick Edgecombe
 * and Michael Kelley's 2024 series, lore
 * 20240311161558.1310-1-mhklinux@outlook.com; CVE-2024-36911), and
 * kernel/dma/direct.c: "If memory cannot be re-encrypted, it must be
 * leaked". virt: tdx-guest also leaks after a failed decrypt (lore
 * 20240619111801.25630-1-lirongqing@baidu.com). A chunk whose conversion
 * fails in either direction is therefore never used again and never
 * freed: freeing a page that may still be shared would hand memory the
 * host can read to the next allocation. The kernel itself WARNs once on
 * such a failure ("CPA VMM failure to convert memory").
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cc_platform.h>
#include <linux/ctype.h>
#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/minmax.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/set_memory.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <asm/cpufeature.h>

#define MAX_PAGES	65536
#define MAX_CHUNK	1024
#define MAX_LOOPS	1000000
#define MAX_REQUEST	256
#define RESULT_SIZE	1536
#define WORDS_PER_PAGE	(PAGE_SIZE / sizeof(u64))

/* Which fill a page holds: the seed stream differs per phase and loop. */
enum fill_phase {
	FILL_PRIVATE = 1,
	FILL_SHARED = 2,
};

struct request {
	u64 pages;
	u64 seed;
	u64 loops;
	u64 chunk;
	u64 fail_call;
};

/*
 * @first_page: index of the chunk's first page in the run (for the fill).
 * @leaked: a conversion failed; the chunk is never touched or freed again.
 */
struct chunk {
	void *addr;
	unsigned int pages;
	unsigned long first_page;
	bool leaked;
};

struct mismatch {
	const char *check;
	unsigned long chunk;
	unsigned long page;
	unsigned long word;
	u64 expected;
	u64 seen;
};

struct counters {
	u64 decrypt_calls, decrypt_ok, decrypt_failed;
	u64 encrypt_calls, encrypt_ok, encrypt_failed;
	u64 preserved_checked, preserved_mismatched;	/* pages */
	u64 roundtrip_checked, roundtrip_mismatched;	/* pages */
	u64 leaked_pages;
	u64 injected;
	int first_error;
	bool have_mismatch;
	struct mismatch first_mismatch;
};

static DEFINE_MUTEX(run_lock);
static char result[RESULT_SIZE];
static size_t result_len;
static u64 leaked_pages_total;
static struct dentry *debug_dir;

/* splitmix64: a fast, well-mixed 64-bit sequence from a counter. */
static u64 mix64(u64 x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static u64 stream_key(u64 seed, enum fill_phase phase, u64 loop)
{
	return mix64(seed ^ ((u64)phase << 56) ^ (loop << 8));
}

static u64 fill_word(u64 key, unsigned long page, unsigned long word)
{
	return mix64(key + (u64)page * WORDS_PER_PAGE + word);
}

static void fill_chunk(const struct chunk *c, u64 key)
{
	unsigned long p, w;

	for (p = 0; p < c->pages; p++) {
		u64 *words = c->addr + p * PAGE_SIZE;

		for (w = 0; w < WORDS_PER_PAGE; w++)
			words[w] = fill_word(key, c->first_page + p, w);
	}
}

/* Count the chunk's pages whose contents differ from the fill @key. */
static void check_chunk(const struct chunk *c, unsigned long index, u64 key,
			const char *check, u64 *checked, u64 *mismatched,
			struct counters *n)
{
	unsigned long p, w;

	for (p = 0; p < c->pages; p++) {
		const u64 *words = c->addr + p * PAGE_SIZE;

		(*checked)++;
		for (w = 0; w < WORDS_PER_PAGE; w++) {
			u64 expected = fill_word(key, c->first_page + p, w);

			if (words[w] == expected)
				continue;
			(*mismatched)++;
			if (!n->have_mismatch) {
				n->have_mismatch = true;
				n->first_mismatch = (struct mismatch) {
					.check = check,
					.chunk = index,
					.page = p,
					.word = w,
					.expected = expected,
					.seen = words[w],
				};
			}
			break;
		}
	}
}

static void note_error(struct counters *n, int err)
{
	if (!n->first_error)
		n->first_error = err;
}

static void leak_chunk(struct chunk *c, struct counters *n)
{
	c->leaked = true;
	n->leaked_pages += c->pages;
}

static const char *platform_name(void)
{
	if (!cc_platform_has(CC_ATTR_MEM_ENCRYPT))
		return "none";
	if (boot_cpu_has(X86_FEATURE_TDX_GUEST))
		return "tdx";
	if (cc_platform_has(CC_ATTR_GUEST_SEV_SNP))
		return "sev-snp";
	if (cc_platform_has(CC_ATTR_GUEST_STATE_ENCRYPT))
		return "sev-es";
	if (cc_platform_has(CC_ATTR_GUEST_MEM_ENCRYPT))
		return "sev";
	return "other";
}

/* Make the next conversion call, unless the request injects its failure. */
static int convert_call(struct chunk *c, const struct request *req,
			struct counters *n, bool encrypt)
{
	u64 call = n->decrypt_calls + n->encrypt_calls;

	if (req->fail_call && call == req->fail_call) {
		n->injected++;
		return -EIO;
	}
	if (encrypt)
		return set_memory_encrypted((unsigned long)c->addr, c->pages);
	return set_memory_decrypted((unsigned long)c->addr, c->pages);
}

/* One loop over one chunk: to shared, check, to private, check. */
static void convert_chunk(struct chunk *c, unsigned long index,
			  const struct request *req, u64 loop, bool preserved,
			  struct counters *n)
{
	u64 private_key = stream_key(req->seed, FILL_PRIVATE, loop);
	u64 shared_key = stream_key(req->seed, FILL_SHARED, loop);
	int ret;

	n->decrypt_calls++;
	ret = convert_call(c, req, n, false);
	if (ret) {
		n->decrypt_failed++;
		note_error(n, ret);
		leak_chunk(c, n);
		return;
	}
	n->decrypt_ok++;
	if (preserved)
		check_chunk(c, index, private_key, "preserved-after-decrypt",
			    &n->preserved_checked, &n->preserved_mismatched, n);
	fill_chunk(c, shared_key);
	check_chunk(c, index, shared_key, "roundtrip-shared",
		    &n->roundtrip_checked, &n->roundtrip_mismatched, n);

	n->encrypt_calls++;
	ret = convert_call(c, req, n, true);
	if (ret) {
		n->encrypt_failed++;
		note_error(n, ret);
		leak_chunk(c, n);
		return;
	}
	n->encrypt_ok++;
	if (preserved)
		check_chunk(c, index, shared_key, "preserved-after-encrypt",
			    &n->preserved_checked, &n->preserved_mismatched, n);
	/* The next loop expects the private fill of loop + 1. */
	private_key = stream_key(req->seed, FILL_PRIVATE, loop + 1);
	fill_chunk(c, private_key);
	check_chunk(c, index, private_key, "roundtrip-private",
		    &n->roundtrip_checked, &n->roundtrip_mismatched, n);
}

static int run_conversions(const struct request *req, struct counters *n,
			   bool preserved, unsigned long *nchunks)
{
	unsigned long count = DIV_ROUND_UP(req->pages, req->chunk);
	struct chunk *chunks;
	unsigned long i;
	int err = 0;
	u64 loop;

	*nchunks = count;
	chunks = kvcalloc(count, sizeof(*chunks), GFP_KERNEL);
	if (!chunks)
		return -ENOMEM;
	for (i = 0; i < count; i++) {
		struct chunk *c = &chunks[i];

		c->first_page = i * req->chunk;
		c->pages = min_t(u64, req->chunk, req->pages - c->first_page);
		c->addr = alloc_pages_exact(c->pages * PAGE_SIZE,
					    GFP_KERNEL | __GFP_NOWARN);
		if (!c->addr) {
			err = -ENOMEM;
			goto out_free;
		}
		fill_chunk(c, stream_key(req->seed, FILL_PRIVATE, 0));
	}

	for (loop = 0; loop < req->loops; loop++) {
		for (i = 0; i < count; i++) {
			if (chunks[i].leaked)
				continue;
			convert_chunk(&chunks[i], i, req, loop, preserved, n);
			cond_resched();
			/* Every chunk is private again here: safe to stop. */
			if (fatal_signal_pending(current)) {
				err = -EINTR;
				goto out_free;
			}
		}
	}

out_free:
	for (i = 0; i < count; i++) {
		if (chunks[i].addr && !chunks[i].leaked)
			free_pages_exact(chunks[i].addr,
					 chunks[i].pages * PAGE_SIZE);
	}
	kvfree(chunks);
	return err;
}

/* Keep only characters that need no JSON escaping, for echoing input. */
static void safe_copy(char *dst, size_t size, const char *src)
{
	size_t i;

	for (i = 0; i + 1 < size && src[i]; i++)
		dst[i] = isalnum(src[i]) || src[i] == '_' ? src[i] : '?';
	dst[i] = '\0';
}

static __printf(2, 3) void set_error(int err, const char *fmt, ...)
{
	char message[160];
	va_list args;

	va_start(args, fmt);
	vsnprintf(message, sizeof(message), fmt, args);
	va_end(args);
	result_len = scnprintf(result, sizeof(result),
			       "{\"error\":%d,\"message\":\"%s\"}\n", err,
			       message);
}

static int parse_request(char *text, struct request *req)
{
	char *token, *value, *cursor = text;
	char key[17];
	u64 max_chunk;
	u64 number;

	*req = (struct request) { .pages = 16, .seed = 0, .loops = 1,
				  .chunk = 1, .fail_call = 0 };
	while ((token = strsep(&cursor, " \t\n")) != NULL) {
		if (!*token)
			continue;
		value = strchr(token, '=');
		if (!value) {
			safe_copy(key, sizeof(key), token);
			set_error(-EINVAL, "expected key=value, got %s", key);
			return -EINVAL;
		}
		*value++ = '\0';
		safe_copy(key, sizeof(key), token);
		if (kstrtou64(value, 0, &number)) {
			set_error(-EINVAL, "%s needs a number", key);
			return -EINVAL;
		}
		if (!strcmp(token, "pages")) {
			req->pages = number;
		} else if (!strcmp(token, "seed")) {
			req->seed = number;
		} else if (!strcmp(token, "loops")) {
			req->loops = number;
		} else if (!strcmp(token, "chunk")) {
			req->chunk = number;
		} else if (!strcmp(token, "fail_call")) {
			req->fail_call = number;
		} else {
			set_error(-EINVAL, "unknown key %s (use %s)", key,
				  "pages seed loops chunk fail_call");
			return -EINVAL;
		}
	}
	if (req->pages < 1 || req->pages > MAX_PAGES) {
		set_error(-EINVAL, "pages=%llu out of range 1..%d", req->pages,
			  MAX_PAGES);
		return -EINVAL;
	}
	max_chunk = min_t(u64, req->pages, MAX_CHUNK);
	if (req->chunk < 1 || req->chunk > max_chunk) {
		set_error(-EINVAL, "chunk=%llu out of range 1..%llu",
			  req->chunk, max_chunk);
		return -EINVAL;
	}
	if (req->loops < 1 || req->loops > MAX_LOOPS) {
		set_error(-EINVAL, "loops=%llu out of range 1..%d", req->loops,
			  MAX_LOOPS);
		return -EINVAL;
	}
	return 0;
}

static void format_result(const struct request *req, const struct counters *n,
			  unsigned long nchunks, bool preserved, int err,
			  u64 elapsed_ns)
{
	const struct mismatch *m = &n->first_mismatch;
	size_t len;

	len = scnprintf(result, sizeof(result),
			"{\"error\":%d,\"message\":\"%s\",\"platform\":\"%s\","
			"\"contents_after_conversion\":\"%s\","
			"\"pages\":%llu,\"seed\":%llu,\"loops\":%llu,"
			"\"chunk\":%llu,\"chunks\":%lu,"
			"\"decrypt\":{\"calls\":%llu,\"ok\":%llu,\"failed\":%llu},"
			"\"encrypt\":{\"calls\":%llu,\"ok\":%llu,\"failed\":%llu},"
			"\"preserved\":{\"checked_pages\":%llu,\"mismatched_pages\":%llu},"
			"\"roundtrip\":{\"checked_pages\":%llu,\"mismatched_pages\":%llu},"
			"\"first_call_error\":%d,\"injected_failures\":%llu,"
			"\"leaked_pages\":%llu,"
			"\"leaked_pages_total\":%llu,\"elapsed_ns\":%llu,",
			err, err == -EINTR ? "interrupted" :
			err ? "out of memory" : "ok",
			platform_name(), preserved ? "preserved" : "undefined",
			req->pages, req->seed, req->loops, req->chunk, nchunks,
			n->decrypt_calls, n->decrypt_ok, n->decrypt_failed,
			n->encrypt_calls, n->encrypt_ok, n->encrypt_failed,
			n->preserved_checked, n->preserved_mismatched,
			n->roundtrip_checked, n->roundtrip_mismatched,
			n->first_error, n->injected, n->leaked_pages,
			leaked_pages_total,
			elapsed_ns);
	if (n->have_mismatch)
		len += scnprintf(result + len, sizeof(result) - len,
				 "\"first_mismatch\":{\"check\":\"%s\","
				 "\"chunk\":%lu,\"page\":%lu,\"word\":%lu,"
				 "\"expected\":\"0x%016llx\",\"seen\":\"0x%016llx\"}}\n",
				 m->check, m->chunk, m->page, m->word,
				 m->expected, m->seen);
	else
		len += scnprintf(result + len, sizeof(result) - len,
				 "\"first_mismatch\":null}\n");
	result_len = len;
}

static ssize_t run_write(struct file *file, const char __user *buf,
			 size_t count, loff_t *ppos)
{
	char text[MAX_REQUEST + 1];
	struct counters n = {};
	struct request req;
	unsigned long nchunks = 0;
	bool preserved;
	u64 start;
	int err;

	if (mutex_lock_interruptible(&run_lock))
		return -EINTR;
	if (count > MAX_REQUEST) {
		set_error(-EINVAL, "request longer than %d bytes", MAX_REQUEST);
		err = -EINVAL;
		goto out;
	}
	if (copy_from_user(text, buf, count)) {
		set_error(-EFAULT, "cannot read the request");
		err = -EFAULT;
		goto out;
	}
	text[count] = '\0';
	err = parse_request(text, &req);
	if (err)
		goto out;

	/* Where the platform converts nothing, contents must survive. */
	preserved = !cc_platform_has(CC_ATTR_MEM_ENCRYPT);
	start = ktime_get_ns();
	err = run_conversions(&req, &n, preserved, &nchunks);
	leaked_pages_total += n.leaked_pages;
	format_result(&req, &n, nchunks, preserved, err,
		      ktime_get_ns() - start);
	if (n.leaked_pages)
		pr_warn("leaked %llu pages after failed conversions (%d)\n",
			n.leaked_pages, n.first_error);
out:
	mutex_unlock(&run_lock);
	return err ? err : count;
}

static ssize_t result_read(struct file *file, char __user *buf, size_t count,
			   loff_t *ppos)
{
	ssize_t ret;

	if (mutex_lock_interruptible(&run_lock))
		return -EINTR;
	ret = simple_read_from_buffer(buf, count, ppos, result, result_len);
	mutex_unlock(&run_lock);
	return ret;
}

static const struct file_operations run_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.write = run_write,
	.llseek = noop_llseek,
};

static const struct file_operations result_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.read = result_read,
	.llseek = default_llseek,
};

static int __init cvmlab_convert_init(void)
{
	set_error(-ENODATA, "no run yet");
	debug_dir = debugfs_create_dir(KBUILD_MODNAME, NULL);
	if (IS_ERR(debug_dir))
		return PTR_ERR(debug_dir);
	debugfs_create_file("run", 0200, debug_dir, NULL, &run_fops);
	debugfs_create_file("result", 0400, debug_dir, NULL, &result_fops);
	pr_info("ready (platform %s)\n", platform_name());
	return 0;
}

static void __exit cvmlab_convert_exit(void)
{
	debugfs_remove(debug_dir);
}

module_init(cvmlab_convert_init);
module_exit(cvmlab_convert_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("cvmlab");
MODULE_DESCRIPTION("Private<->shared conversion driver for cvmlab tests");
