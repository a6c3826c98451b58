"""Confidential objects as the argv builder writes them, checked against real QEMU builds.

Every property `confidential_object()` can emit is looked up, one test per property, in
`qom-list-properties` of the QEMU that has the object: `sev-snp-guest` in the installed
QEMU 10.0 (bookworm-backports), `tdx-guest` in QEMU 11.1 from trixie-backports, unpacked
into a private prefix (orchestrator.qemu.private_build; fetched on first use, then a
cached lookup of a few ms). Then each QEMU is handed the whole generated object with QMP
`object-add`, so its own QAPI parser judges names, types and required members.

Tests that need QEMU 11.1 take the `qemu_11_1_private` fixture: it fetches the prefix, and
skips (with apt's reason) only when Debian's archive is unreachable and nothing is cached.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import types
import typing
from collections.abc import Sequence
from typing import Any

import pytest

from orchestrator.errors import QemuError
from orchestrator.qemu.argv import confidential_object
from orchestrator.qemu.introspect import QemuFacts, introspect_qemu
from orchestrator.qemu.private_build import ArchiveUnreachable, PrivateQemu, private_qemu
from orchestrator.qemu.rules import QEMU_RULES, validate, violations
from orchestrator.qemu.spec import (
    Firmware,
    KernelBoot,
    MachineSpec,
    QuoteGenerationSocket,
    SnpGuest,
    TdxGuest,
)

INSTALLED_QEMU = "qemu-system-x86_64"
_Cgs = typing.TypeVar("_Cgs", SnpGuest, TdxGuest)
QMP_TIMEOUT_S = 30.0

# Byte lengths QEMU (and rules.py) require of the base64 members.
_BASE64_BYTES = {
    "guest_visible_workarounds": 16,
    "id_block": 96,
    "id_auth": 4096,
    "host_data": 32,
    "mrconfigid": 48,
    "mrowner": 48,
    "mrownerconfig": 48,
}
_SPECIAL_VALUES: dict[str, Any] = {
    "cbitpos": 51,
    "reduced_phys_bits": 1,
    "policy": 0x30000,
    "attributes": 0x10000000,
    "quote_generation_socket": QuoteGenerationSocket(type="vsock", cid=2, port=4050),
}


def _value_for(name: str, annotation: Any) -> Any:
    """A valid, non-default value for a spec field, so the builder emits its property."""
    if name in _SPECIAL_VALUES:
        return _SPECIAL_VALUES[name]
    if name in _BASE64_BYTES:
        return base64.b64encode(bytes(i % 251 for i in range(_BASE64_BYTES[name]))).decode()
    if isinstance(annotation, types.UnionType):
        options = set(typing.get_args(annotation)) - {type(None)}
    else:
        options = {annotation}
    if bool in options:
        return True
    if int in options:
        return 1
    raise AssertionError(f"no test value for {name}: {annotation}; add one here")


def fully_set(cls: type[_Cgs]) -> _Cgs:
    """The confidential spec with every field set: every property the builder can emit."""
    hints = typing.get_type_hints(cls)
    values = {
        field.name: _value_for(field.name, hints[field.name])
        for field in dataclasses.fields(cls)
        if field.name != "kind"
    }
    return cls(**values)


def emitted(cgs: SnpGuest | TdxGuest) -> dict[str, Any]:
    """The builder's -object JSON for `cgs`, without qom-type and id."""
    body = json.loads(confidential_object(cgs))
    body.pop("qom-type")
    body.pop("id")
    return dict(body)


FULL_SNP = fully_set(SnpGuest)
FULL_TDX = fully_set(TdxGuest)
SNP_PROPERTIES = sorted(emitted(FULL_SNP))
TDX_PROPERTIES = sorted(emitted(FULL_TDX))

# JSON value types that fit each QOM property type (qom-list-properties' "type").
_QOM_TYPES: dict[type, tuple[str, ...]] = {
    bool: ("bool",),
    int: ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "int", "size"),
    str: ("string", "str"),
}


def fits(value: Any, qom_type: str) -> bool:
    """A JSON value fits the QOM property type (objects fit QAPI struct types)."""
    if isinstance(value, dict):
        return qom_type[:1].isupper()  # a QAPI struct or union, e.g. SocketAddress
    return qom_type in _QOM_TYPES[type(value)]


def confidential_spec(cgs: SnpGuest | TdxGuest) -> MachineSpec:
    """A spec that passes every spec rule, so only the QEMU rules can refuse it."""
    firmware = Firmware(path="/lab/firmware.fd")
    return MachineSpec(
        boot=KernelBoot(kernel="/img/vmlinuz", firmware=firmware),
        accel="kvm",
        cpu="host",
        confidential=cgs,
    )


def object_add(command: Sequence[str], body: dict[str, Any], read_back: str) -> dict[str, Any]:
    """Start `command` with -machine none, `object-add` the object, `qom-get` one property.

    Returns {"add": reply, "get": reply}. QMP runs on stdio: every command is written
    up front, QEMU answers them in order, and `quit` ends it (within QMP_TIMEOUT_S).
    """
    lines = [
        {"execute": "qmp_capabilities"},
        {"execute": "object-add", "arguments": body},
        {
            "execute": "qom-get",
            "arguments": {"path": f"/objects/{body['id']}", "property": read_back},
        },
        {"execute": "quit"},
    ]
    result = subprocess.run(
        [*command, "-machine", "none", "-nodefaults", "-display", "none", "-no-user-config",
         "-qmp", "stdio"],
        input="".join(json.dumps(line) + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=QMP_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    replies = [
        message
        for message in map(json.loads, result.stdout.splitlines())
        if "return" in message or "error" in message
    ]
    assert result.returncode == 0 and len(replies) == 4, (
        f"QEMU exited with {result.returncode} after {len(replies)} replies: {result.stderr}"
    )
    return {"add": replies[1], "get": replies[2]}


# --- the QEMUs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu_10() -> QemuFacts:
    """The installed QEMU (10.0.2 from bookworm-backports here), introspected over QMP."""
    if shutil.which(INSTALLED_QEMU) is None:
        pytest.skip(f"{INSTALLED_QEMU} is not installed (run ci/setup-host.sh)")
    return introspect_qemu(INSTALLED_QEMU)


@pytest.fixture(scope="module")
def qemu_11_1_private() -> PrivateQemu:
    """QEMU from trixie-backports in the private prefix: fetched once, then cached."""
    try:
        return private_qemu(progress=lambda message: None)
    except ArchiveUnreachable as error:
        pytest.skip(f"QEMU 11.1 from trixie-backports cannot be fetched: {error}")


@pytest.fixture(scope="module")
def qemu_11_1(qemu_11_1_private: PrivateQemu) -> QemuFacts:
    """That QEMU's facts, introspected through its own loader."""
    return introspect_qemu(qemu_11_1_private.command())


# --- what the builder emits ---------------------------------------------------------------


def test_every_snp_field_reaches_the_command_line() -> None:
    fields = [f.name for f in dataclasses.fields(SnpGuest) if f.name != "kind"]
    assert len(SNP_PROPERTIES) == len(fields), (SNP_PROPERTIES, fields)


def test_every_tdx_field_reaches_the_command_line() -> None:
    fields = [f.name for f in dataclasses.fields(TdxGuest) if f.name != "kind"]
    assert len(TDX_PROPERTIES) == len(fields), (TDX_PROPERTIES, fields)


# --- property by property ------------------------------------------------------------------


@pytest.mark.parametrize("prop", SNP_PROPERTIES)
def test_sev_snp_guest_property_exists_in_qemu_10(qemu_10: QemuFacts, prop: str) -> None:
    assert qemu_10.has_type("sev-snp-guest"), f"{qemu_10.describe()} has no sev-snp-guest"
    props = qemu_10.properties["sev-snp-guest"]
    assert prop in props, f"{qemu_10.describe()}'s sev-snp-guest has no {prop}: {sorted(props)}"
    value = emitted(FULL_SNP)[prop]
    assert fits(value, props[prop]), f"{prop}={value!r} does not fit QOM type {props[prop]}"


@pytest.mark.parametrize("prop", TDX_PROPERTIES)
def test_tdx_guest_property_exists_in_qemu_11_1(qemu_11_1: QemuFacts, prop: str) -> None:
    assert qemu_11_1.has_type("tdx-guest"), f"{qemu_11_1.describe()} has no tdx-guest"
    props = qemu_11_1.properties["tdx-guest"]
    assert prop in props, f"{qemu_11_1.describe()}'s tdx-guest has no {prop}: {sorted(props)}"
    value = emitted(FULL_TDX)[prop]
    assert fits(value, props[prop]), f"{prop}={value!r} does not fit QOM type {props[prop]}"


# --- the whole object, parsed by QEMU itself ----------------------------------------------


def test_qemu_10_accepts_the_generated_sev_snp_guest_object(qemu_10: QemuFacts) -> None:
    body = json.loads(confidential_object(FULL_SNP))
    replies = object_add(qemu_10.command, body, "policy")
    assert replies["add"] == {"return": {}}, replies["add"]
    assert replies["get"] == {"return": FULL_SNP.policy}


def test_qemu_11_1_accepts_the_generated_tdx_guest_object(
    qemu_11_1_private: PrivateQemu,
) -> None:
    # Over QMP on purpose: QEMU 11.1.3 aborts (KVM_STATE assertion) when `-object
    # tdx-guest` is given on the command line of a QEMU without KVM; object-add works.
    body = json.loads(confidential_object(FULL_TDX))
    replies = object_add(qemu_11_1_private.command(), body, "attributes")
    assert replies["add"] == {"return": {}}, replies["add"]
    assert replies["get"] == {"return": FULL_TDX.attributes}


def test_qemu_refuses_an_object_property_it_lacks(qemu_10: QemuFacts) -> None:
    """The object-add check can fail: a property QEMU does not know is refused by name."""
    body = {**json.loads(confidential_object(FULL_SNP)), "no-such-property": True}
    replies = object_add(qemu_10.command, body, "policy")
    assert "no-such-property" in replies["add"]["error"]["desc"], replies["add"]


# --- at spec time, on any host ---------------------------------------------------------------


def test_tdx_spec_against_qemu_10_is_an_error_naming_its_version(qemu_10: QemuFacts) -> None:
    if qemu_10.has_type("tdx-guest"):
        pytest.skip(f"{qemu_10.describe()} has tdx-guest")
    with pytest.raises(QemuError) as caught:
        validate(confidential_spec(FULL_TDX), qemu_10)
    message = str(caught.value)
    assert "tdx-guest" in message
    assert str(qemu_10.version) in message  # 10.0.2 on the CI machines
    assert "10.1" in message


def test_full_tdx_spec_passes_every_qemu_rule_of_qemu_11_1(qemu_11_1: QemuFacts) -> None:
    assert violations(confidential_spec(FULL_TDX), qemu_11_1, QEMU_RULES) == []


def test_full_snp_spec_passes_every_qemu_rule_of_qemu_10(qemu_10: QemuFacts) -> None:
    assert violations(confidential_spec(FULL_SNP), qemu_10, QEMU_RULES) == []


def test_second_fetch_of_the_private_qemu_is_a_cache_hit(
    qemu_11_1_private: PrivateQemu,
) -> None:
    messages: list[str] = []
    again = private_qemu(progress=messages.append)
    assert again == qemu_11_1_private
    assert messages == []  # no refresh, no download, no unpack
