/*
 * dropbear-quiet-seed.so: preloaded into the guest's dropbear (its listener and the
 * session processes it forks), and into nothing they exec.
 *
 * Why: for every connection it accepts, dropbear's listener calls seedrandom()
 * (dbrandom.c, svr-main.c), which takes 32 bytes from getrandom() and then also
 * hashes /proc/timer_list, /proc/interrupts, /proc/vmstat and six more /proc files
 * into its pool. A restored TCG guest runs those kernel formatters for the first time
 * in that QEMU, before its first SSH answer: measured with `-d in_asm`, 36.1k blocks
 * translated between `cont` and the first command's answer with them, 34.8k
 * without. The seed does not need them: getrandom() is the kernel's CSPRNG, seeded
 * by RDRAND and reseeded by vmgenid after every restore.
 *
 * What: open()/open64() of exactly those paths fail with ENOENT, which
 * dropbear's process_file() skips; every other open is the plain openat(2).
 * The constructor drops LD_PRELOAD from the environment, and dropbear clears
 * the environment before it runs a session's shell anyway, so commands run over
 * SSH see /proc as it is (tests/test_guest_helper.py checks the preload, and
 * tests/test_guest_access.py what a guest runs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *const seed_files[] = {
	"/proc/timer_list",
	"/proc/interrupts",
	"/proc/loadavg",
	"/proc/sys/kernel/random/entropy_avail",
	"/proc/net/netstat",
	"/proc/net/dev",
	"/proc/net/tcp",
	"/proc/net/rt_cache",
	"/proc/vmstat",
	NULL,
};

__attribute__((constructor)) static void forget_preload(void)
{
	unsetenv("LD_PRELOAD");
}

static int is_seed_file(const char *path)
{
	for (const char *const *file = seed_files; *file; file++)
		if (!strcmp(path, *file))
			return 1;
	return 0;
}

static int open_unless_seed_file(const char *path, int flags, mode_t mode)
{
	if (path && is_seed_file(path)) {
		errno = ENOENT;
		return -1;
	}
	return (int)syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

static int needs_mode(int flags)
{
	return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	if (needs_mode(flags)) {
		va_list args;
		va_start(args, flags);
		mode = va_arg(args, mode_t);
		va_end(args);
	}
	return open_unless_seed_file(path, flags, mode);
}

/* The same entry under its large-file name (what callers built with
 * _FILE_OFFSET_BITS=64 link to). */
int open64(const char *path, int flags, ...) __attribute__((alias("open")));
