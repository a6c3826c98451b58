/*
 * dropbear-rtc-clock.so: preloaded into the guest's dropbear, so that every SSH
 * session of a guest restored from a snapshot starts with the host's time.
 *
 * Why: a restored guest's clock stands where the snapshot was saved (TCG's guest
 * clock does not run while the snapshot waits), but its CMOS RTC does not: QEMU
 * computes the RTC from the host clock (`-rtc clock=host`, the default), across a
 * migration too (hw/rtc/mc146818rtc.c, get_guest_rtc_ns). Measured: restored 6 s
 * after the save, the guest read 1796679052 from the RTC and 1796679045 from its
 * clock, with the host at 1796679053. Setting the clock in the SSH listener, before
 * it forks the connection's process, means no session ever sees the stale time, and
 * a warm start needs no command of its own for it (it was `date -s` over SSH: the
 * restored guest's first exec, 1.8k of the 35.5k blocks TCG translated from `cont`
 * to the first command's answer).
 *
 * What: after each accept() that returns a connection, read the RTC's seconds from
 * /sys/class/rtc/rtc0/since_epoch; if the clock's second is behind it, set the clock
 * forward to that second with clock_settime(). Never backward. The clock then has the
 * RTC's time, as after a cold boot (the kernel sets it from the same RTC at boot):
 * up to 2 s behind the host's, because QEMU starts its RTC at the host's whole
 * second and the RTC counts whole seconds (`date -s @SECONDS` over SSH, which this
 * replaces, set the host's second). A move of 2 s or more (a restore, or a pause)
 * is said in the kernel log (/dev/kmsg, kept as guest-dmesg.txt) at KERN_INFO, below
 * the console's loglevel: on the console, the line went out through the emulated
 * UART in the listener's own write, before it forked the connection's process.
 * Smaller moves, which a running guest's whole seconds can show at any connection,
 * are not logged. No RTC, an unreadable one or a refused set change nothing (a
 * refused set of 2 s or more is logged, as a warning). The constructor drops
 * LD_PRELOAD, as dropbear-quiet-seed.c's does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RTC_SECONDS "/sys/class/rtc/rtc0/since_epoch"
#define LOGGED_FROM 2

__attribute__((constructor)) static void forget_preload(void)
{
	unsetenv("LD_PRELOAD");
}

static void kernel_log(const char *line)
{
	int fd = (int)syscall(SYS_openat, AT_FDCWD, "/dev/kmsg", O_WRONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return;
	ssize_t ignored = write(fd, line, strlen(line));
	(void)ignored;
	close(fd);
}

/* The RTC's seconds since the epoch, or -1 (no RTC, unreadable, not a number). */
static long long rtc_seconds(void)
{
	char text[32] = {0};
	int fd = (int)syscall(SYS_openat, AT_FDCWD, RTC_SECONDS, O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	ssize_t got = read(fd, text, sizeof(text) - 1);
	close(fd);
	if (got <= 0)
		return -1;
	char *end = NULL;
	errno = 0;
	long long seconds = strtoll(text, &end, 10);
	if (errno || end == text || (*end != '\n' && *end != '\0') || seconds <= 0)
		return -1;
	return seconds;
}

static void clock_from_rtc(void)
{
	int saved_errno = errno;
	long long rtc = rtc_seconds();
	struct timespec now;
	if (rtc > 0 && clock_gettime(CLOCK_REALTIME, &now) == 0 && rtc > (long long)now.tv_sec) {
		long long behind = rtc - (long long)now.tv_sec;
		struct timespec set = {.tv_sec = (time_t)rtc, .tv_nsec = 0};
		char line[160];
		if (clock_settime(CLOCK_REALTIME, &set) == 0)
			snprintf(line, sizeof(line),
				 "<6>cvmlab: guest clock was %lld s behind the RTC; set from it\n", behind);
		else
			snprintf(line, sizeof(line),
				 "<4>cvmlab: guest clock is %lld s behind the RTC; setting it failed: %s\n",
				 behind, strerror(errno));
		if (behind >= LOGGED_FROM)
			kernel_log(line);
	}
	errno = saved_errno;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	int conn = (int)syscall(SYS_accept4, fd, addr, len, 0);
	if (conn >= 0)
		clock_from_rtc();
	return conn;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	int conn = (int)syscall(SYS_accept4, fd, addr, len, flags);
	if (conn >= 0)
		clock_from_rtc();
	return conn;
}
