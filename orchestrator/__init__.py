"""cvmlab: end-to-end tests of confidential-guest memory on KVM and QEMU.

The core library never imports avocado; `orchestrator.scenario` is the only
module that does, so pytest, `cvmlab repro` and plain scripts share the rest.
"""

__version__ = "0.1.0"
