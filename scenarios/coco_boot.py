"""G1: a TDX or SEV-SNP guest is what was asked for, seen from inside and from the host.

Lab only (tiers tdx, snp; elsewhere every variant CANCELs with the probe's reason).
The machine comes from scenarios/variants/coco.yaml (confidential=tdx|snp, KVM, cpu
host, a memfd shared half); firmware and, for SNP, cbitpos/reduced-phys-bits are found
on the host by orchestrator.host.confidential.prepare_confidential.

Inside the guest (orchestrator.guest.coco, one SSH command):
- the kernel's "Memory Encryption Features active: Intel TDX" / "...SEV-SNP" line;
- /proc/cpuinfo flags `tdx_guest`, or `sev sev_es sev_snp`;
- /dev/tdx_guest or /dev/sev-guest after loading tdx_guest / sev_guest;
- a configfs-tsm report that carries our 64-byte nonce, from the expected provider.
  A TD's report is a quote, which needs the lab's quote-generation service: without
  qgs_path / qgs_vsock_port that check is not applicable (it says so).
On the host:
- QEMU holds guest_memfd fds (`anon_inode:[kvm-gmem]`) covering guest RAM;
- SNP: QMP `query-sev` says sev-type sev-snp, state running, and snp-policy equals the
  policy asked for (tp-qemu snp_basic_config.py does the same);
- G3 and H8: both kernel logs stay clean.

    avocado run scenarios/coco_boot.py -m scenarios/variants/coco.yaml
"""

from __future__ import annotations

from orchestrator.guest.coco import EXPECTED, read_guest_coco
from orchestrator.invariants.conversions import gmem_covers_ram_verdict
from orchestrator.invariants.verdict import holds, not_applicable
from orchestrator.machine_scenario import MachineScenario
from orchestrator.memory.conversions.gmem import sample_gmem
from orchestrator.qemu.spec import SnpGuest, TdxGuest


class CocoBoot(MachineScenario):
    """
    :avocado: enable
    :avocado: tags=confidential,smoke,tier:tdx,tier:snp
    """

    timeout = 600
    boot_timeout = 300.0  # firmware + lazy acceptance under KVM; generous for big guests

    def test_the_guest_is_confidential_inside_and_out(self) -> None:
        cgs = self.spec.confidential
        if cgs is None:
            self.cancel("coco_boot needs a confidential variant (confidential=tdx or snp)")
        assert cgs is not None
        platform = "tdx" if isinstance(cgs, TdxGuest) else "sev-snp"
        expected = EXPECTED[platform]
        coco = read_guest_coco(self.guest, module=str(expected["module"]))
        self.timeline.record("guest", "coco", **coco.to_json())
        self.check(
            holds(
                "G1",
                f"the kernel reports memory encryption {platform!r}",
                coco.platform == platform,
                features=coco.features,
            )
        )
        what, ok, details = coco.cpu_evidence(platform)  # SNP: SEV_STATUS, not cpuinfo
        self.check(holds("G1", what, ok, **details))
        self.check(
            holds(
                "G1",
                f"{expected['device']} exists after loading {expected['module']}",
                expected["device"] in coco.devices,
                devices=list(coco.devices),
            )
        )
        quote_service = isinstance(cgs, TdxGuest) and cgs.quote_generation_socket is not None
        if isinstance(cgs, SnpGuest) or quote_service:
            self.check(
                holds(
                    "G1",
                    f"configfs-tsm gives a report from {expected['provider']} that carries "
                    "our 64-byte nonce",
                    coco.tsm_provider == expected["provider"] and coco.report_has_nonce,
                    **coco.to_json(),
                )
            )
        else:
            self.check(
                not_applicable(
                    "G1",
                    "TDX configfs-tsm report: a TD's outblob is a quote, and this machine has "
                    "no quote-generation-socket (give qgs_path= or qgs_vsock_port=)",
                )
            )

        gmem = sample_gmem(self.machine.pid)
        gmem.record(self.timeline)
        self.check(gmem_covers_ram_verdict(gmem, self.spec.memory))

        if isinstance(cgs, SnpGuest):
            sev = self.machine.qmp.execute("query-sev")
            self.check(
                holds(
                    "G1",
                    f"query-sev: an SEV-SNP guest, running, with the policy asked for "
                    f"({cgs.policy:#x})",
                    sev.get("sev-type") == "sev-snp"
                    and sev.get("enabled") is True
                    and sev.get("state") == "running"
                    and sev.get("snp-policy") == cgs.policy,
                    query_sev=sev,
                )
            )
        self.check_guest_log_clean()
        self.check_host_log_clean()
