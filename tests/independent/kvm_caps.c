/*
 * An independent reading of what the probe reads through orchestrator.kvm: written in C
 * against the numbers of the kernel's include/uapi/linux/kvm.h, no code shared with the
 * Python bindings. Prints one JSON object.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define KVMIO 0xAE
#define KVM_CREATE_VM _IO(KVMIO, 0x01)
#define KVM_CHECK_EXTENSION _IO(KVMIO, 0x03)
#define KVM_CAP_USER_MEMORY2 231
#define KVM_CAP_GUEST_MEMFD 234
#define KVM_CAP_VM_TYPES 235
#define KVM_CAP_GUEST_MEMFD_FLAGS 244

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		printf("{\"dev_kvm\": false}\n");
		return 0;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	int flags = vm >= 0 ? ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS) : -1;
	printf("{\"dev_kvm\": true, \"guest_memfd\": %d, \"user_memory2\": %d, \"vm_types\": %d, "
	       "\"default_vm\": %s, \"gmem_flags\": %d}\n",
	       ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD),
	       ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2),
	       ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES),
	       vm >= 0 ? "true" : "false", flags < 0 ? 0 : flags);
	if (vm >= 0)
		close(vm);
	close(kvm);
	return 0;
}
