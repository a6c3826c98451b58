#!/bin/busybox sh
# /init of the lab's initramfs (busybox). Mounts the host's root read-only over 9p and the
# writable shares listed in the run directory, then runs the lab's runner chrooted into
# it and powers off. PID 1 must never exit (that panics), so every path ends in poweroff.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "cvmlab-lab: $*" > /dev/console; }
halt_lab() { sync; poweroff -f; reboot -f; while :; do sleep 3600; done; }
fail() { say "FAILED: $*"; halt_lab; }

# Modules the 9p mounts need, in load order (none when the kernel has 9p built in).
while read -r module; do
    [ -n "$module" ] && { insmod "/lib/modules/$module" || fail "insmod $module"; }
done < /etc/lab-modules
# KVM and its dependencies, decompressed on the host, loaded in the background while
# the shares mount and the runner starts (about 1.1 s of relocations under TCG on 7.3).
# The runner waits for this subshell to end (a pidfd on CVMLAB_EARLY_PID), then modprobes
# whatever is still missing and reports why: a failure here is not fatal.
(
    while read -r module; do
        [ -n "$module" ] && { insmod "/lib/modules/$module" 2>/dev/null || say "insmod $module failed"; }
    done < /etc/lab-early-modules
) &
export CVMLAB_EARLY_PID=$!

ip link set lo up
OPTS=trans=virtio,version=9p2000.L,msize=524288
mkdir -p /lab /newroot
mount -t 9p -o "$OPTS,cache=none" cvmlabrun /lab || fail "mount of the run directory (9p tag cvmlabrun)"
mount -t 9p -o "$OPTS,ro,cache=loose" hostroot /newroot || fail "mount of the host root (9p tag hostroot)"

# Fresh kernel file systems and scratch space inside the host's tree.
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/hugepages
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
mount -t hugetlbfs hugetlbfs /newroot/dev/hugepages 2>/dev/null

# Writable shares: "<tag> <path>" per line (the checkout, results, the cvmlab cache).
# cache=loose: Python imports thousands of files from the venv and the checkout; uncached
# 9p made each avocado test start take tens of seconds. Writes are written back, and the
# sync before poweroff puts them on the host; nothing on the host writes there meanwhile.
while read -r tag path; do
    [ -n "$tag" ] || continue
    # Under /tmp or /run (fresh tmpfs inside) the mount point must be made first.
    [ -d "/newroot$path" ] || mkdir -p "/newroot$path"
    mount -t 9p -o "$OPTS,cache=loose" "$tag" "/newroot$path" || fail "mount of $path (9p tag $tag)"
done < /lab/mounts

mkdir -p /newroot/run/cvmlab-lab
mount --move /lab /newroot/run/cvmlab-lab
say "root mounted"
chroot /newroot /usr/bin/python3 -I -S /run/cvmlab-lab/inside.py /run/cvmlab-lab \
    || say "runner exited with status $?"
halt_lab
