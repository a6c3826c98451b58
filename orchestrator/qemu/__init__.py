"""QEMU: the machine spec, its command line, and the running process with its QMP session."""
