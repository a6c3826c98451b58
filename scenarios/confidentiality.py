"""H1: a secret written in the guest is invisible to the host, unless the guest is plain.

The guest writes a random secret (generated here, sent over the encrypted SSH channel)
into a tmpfs file, so it sits in guest RAM. The host then looks where host userspace
can read guest memory (orchestrator.memory.secret_scan):
- QMP `dump-guest-memory` (paging=false) into a 0700 directory, searched and deleted;
- QEMU's RAM backing itself: the memfd through QEMU's own fd (pidfd_getfd; only its
  allocated segments are read, so the search never populates anything), or, for
  anonymous RAM, /proc/<pid>/mem of the RAMBlock.

Variants (scenarios/variants/confidentiality.yaml):
- `none` (tier tcg, the control; runs on every host): a plain 256 MiB guest. The secret
  MUST be found in both places: that shows the search works, so "not found" on a
  confidential guest means something. The guest also reports no memory encryption.
- `tdx`, `snp` (lab tiers): the guest reports its platform (G1) and the secret is found
  neither in the dump nor in the shared backing (H1). Elsewhere they CANCEL with the
  probe's reason.

    avocado run scenarios/confidentiality.py -m scenarios/variants/confidentiality.yaml
"""

from __future__ import annotations

from orchestrator.errors import MemoryOpError
from orchestrator.guest.coco import read_guest_coco
from orchestrator.invariants.verdict import holds
from orchestrator.machine_scenario import MachineScenario
from orchestrator.memory.host_punch import HostPuncher, borrowed_fd
from orchestrator.memory.layout import parse_ramblocks
from orchestrator.memory.secret_scan import (
    count_in_fd,
    count_in_process_memory,
    new_secret,
    search_dump,
)
from orchestrator.qemu.argv import RAM_ID
from orchestrator.timeline import now

SECRET_FILE = "/run/cvmlab-secret"
#: Copies the guest writes (a few pages of page cache, so one stray reuse cannot hide it).
COPIES = 64


class Confidentiality(MachineScenario):
    """
    :avocado: enable
    :avocado: tags=confidential,smoke,tier:tcg,tier:tdx,tier:snp
    """

    timeout = 600

    def write_secret(self, secret: str) -> None:
        """The guest writes the secret COPIES times into a tmpfs file and reads it back."""
        script = (
            'i=0; : > "$1"; while [ $i -lt "$3" ]; do printf "%s\\n" "$2" >> "$1"; '
            'i=$((i + 1)); done; grep -c -x -F "$2" "$1"'
        )
        result = self.guest.run(["sh", "-c", script, "cvmlab-secret", SECRET_FILE, secret,
                                 str(COPIES)], timeout=60)  # fmt: skip
        self.timeline.record("guest", "secret-written", file=SECRET_FILE, copies=COPIES)
        self.check(
            holds(
                "G2",
                f"the guest holds the secret ({COPIES} copies in {SECRET_FILE}, tmpfs)",
                result.stdout.strip() == str(COPIES),
                guest_count=result.stdout.strip(),
            )
        )

    def count_in_backing(self, needle: bytes) -> tuple[int, str]:
        """Occurrences of `needle` in QEMU's RAM backing, and how it was read."""
        qmp = self.machine.qmp
        memdev = next(
            (m for m in qmp.execute("query-memdev") if str(m.get("id", "")).endswith(RAM_ID)),
            None,
        )
        if memdev is None:
            raise MemoryOpError(f"QEMU has no backend {RAM_ID}", "see qmp.jsonl")
        puncher = HostPuncher(qmp, self.machine.pid, check_flatview=False)
        kind = puncher.memory_map.memdev(RAM_ID).kind
        if kind in ("memfd", "file"):
            backing = puncher.backing(RAM_ID)
            with borrowed_fd(backing.qemu_pid, backing.qemu_fd) as fd:
                return count_in_fd(fd, needle), f"{kind} fd {backing.qemu_fd} ({backing.target})"
        block = next(b for b in parse_ramblocks(qmp.human_monitor("info ramblock"))
                     if b.is_memdev(RAM_ID))  # fmt: skip
        found = count_in_process_memory(self.machine.pid, block.hva, block.used, needle)
        return found, f"/proc/{self.machine.pid}/mem at {block.hva:#x}+{block.used:#x}"

    def test_a_secret_in_guest_memory_is_hidden_from_the_host_only_when_confidential(
        self,
    ) -> None:
        """The control (plain guest) finds the secret; TDX/SNP guests hide it (H1)."""
        cgs = self.spec.confidential
        platform = {"tdx": "tdx", "snp": "sev-snp"}.get(cgs.kind if cgs else "none", "none")
        coco = read_guest_coco(self.guest)
        self.timeline.record("guest", "coco", **coco.to_json())
        self.check(
            holds(
                "G1",
                f"the guest reports platform {platform!r} (kernel: "
                f"{coco.features or 'no Memory Encryption Features line'})",
                coco.platform == platform,
                **coco.to_json(),
            )
        )
        if platform != "none":
            what, ok, details = coco.cpu_evidence(platform)  # SNP: SEV_STATUS, not cpuinfo
            self.check(holds("G1", what, ok, **details))

        secret = new_secret()
        needle = secret.encode()
        self.write_secret(secret)

        started = now()
        dump = search_dump(self.machine.qmp, needle)
        self.timeline.record("host", "dump-searched", **dump.to_json())
        if dump.dump is not None:
            self.log.info(
                "dump-guest-memory: %d bytes in %.2f s, searched in %.2f s, secret found %d times",
                dump.dump.size, dump.dump.seconds, now() - started - dump.dump.seconds, dump.found,
            )  # fmt: skip
        in_backing, how = self.count_in_backing(needle)
        self.timeline.record("host", "backing-searched", found=in_backing, how=how)
        self.log.info("RAM backing (%s): secret found %d times", how, in_backing)

        if cgs is None:
            self.check(
                holds(
                    "H1",
                    "control: on a plain guest the host sees the secret in dump-guest-memory, "
                    "so the search works (and would catch a leak)",
                    dump.dump is not None and dump.found >= 1,
                    **dump.to_json(),
                )
            )
            self.check(
                holds(
                    "H1",
                    f"control: on a plain guest the host sees the secret in the RAM backing "
                    f"({how})",
                    in_backing >= 1,
                    found=in_backing,
                )
            )
        else:
            self.check(
                holds(
                    "H1",
                    "the secret is not in dump-guest-memory's output"
                    + (f" (QEMU refused the dump: {dump.refused})" if dump.refused else ""),
                    dump.found == 0,
                    **dump.to_json(),
                )
            )
            self.check(
                holds(
                    "H1",
                    f"the secret is not in the shared half of guest RAM ({how})",
                    in_backing == 0,
                    found=in_backing,
                )
            )
        self.check_guest_log_clean()
        self.check_host_log_clean()
