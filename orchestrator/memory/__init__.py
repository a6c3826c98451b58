"""Memory operations on a running guest: hole punches, balloon, virtio-mem; the GPA map."""
