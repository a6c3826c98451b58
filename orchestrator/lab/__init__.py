"""The kernel-under-test lab: real KVM and guest_memfd inside a kernel booted under TCG.

QEMU's TCG emulates AMD SVM with nested paging (`-cpu max`), so a Linux kernel
booted that way loads kvm_amd and has a working `/dev/kvm` whatever the host
kernel offers. `cvmlab lab` boots the kernel under test like that, shares the
host's root read-only over 9p (the checkout, results and cache writable), and
runs one command inside: the same scenarios, against the kernel you choose.
"""
