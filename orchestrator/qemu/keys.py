"""The parameter names a scenario understands: machine keys and the scenario's own.

Kept apart from `orchestrator.qemu.spec` (which parses them) because every test
checks its `-p key=value` against them before anything else, including tests that
never build a machine (the guest_memfd and KVM scenarios): under TCG in the lab,
importing the spec module costs about a second of Python per job.
"""

from __future__ import annotations

# Parameters that belong to the scenario, not to the machine.
SCENARIO_KEYS = frozenset(
    {
        "image",
        "guest_kernel_suite",
        "guest_kernel_version",
        "tiers",
        "timeout",
        "seed",
        "tier",
        "qemu",
    }
)

#: A memory backend's keys (`virtio_mem_` prefixes them for the virtio-mem device).
BACKEND_KEYS = ("backend", "share", "hugetlb", "hugetlbsize", "seal", "mem_path", "discard_data")

#: Every key `spec_from_params` understands.
MACHINE_KEYS = frozenset(
    {
        "accel", "cpu", "smp", "memory", "machine", "kernel", "initrd", "cmdline", "disk",
        "disk_format", "firmware", "firmware_interface", "firmware_vars", "ssh_forward",
        "balloon", "free_page_reporting", "deflate_on_oom", "virtio_mem_size",
        "virtio_mem_requested", "virtio_mem_block_size", "pvpanic", "confidential", "cbitpos",
        "reduced_phys_bits", "snp_policy", "kernel_hashes", "author_key_enabled",
        "vcek_disabled", "guest_visible_workarounds", "id_block", "id_auth", "host_data",
        "tdx_attributes", "sept_ve_disable", "mrconfigid", "mrowner", "mrownerconfig",
        "qgs_path", "qgs_vsock_cid", "qgs_vsock_port", "sev_policy", "legacy_vm_type",
        "tsc_frequency", "trace_events", "name",
        *BACKEND_KEYS,
        *(f"virtio_mem_{key}" for key in BACKEND_KEYS),
    }
)  # fmt: skip
