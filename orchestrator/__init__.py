"""cvmlab: end-to-end tests of confidential-guest memory on KVM and QEMU.

The core library never imports avocado; the scenario base classes
(`orchestrator.scenario`, `machine_scenario`, `kvm_scenario`) and the lab's avocado
launcher and spawner are the only modules that do, so pytest, `cvmlab repro` and
plain scripts share the rest.
"""

__version__ = "0.1.0"
