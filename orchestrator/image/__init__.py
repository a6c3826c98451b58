"""Guest images: build the default `minimal` image from Debian packages, cache, verify.

`default_image()` builds it once and is a cache hit afterwards. Boot the manifest's
`kernel`, `initrd` and `cmdline`; log in as `ssh_user` with `ssh_key`, pinning `host_key`.
"""

from orchestrator.image.builder import STEP_HANDLERS, BuildContext, build_image, default_image
from orchestrator.image.manifest import ImageManifest, load_manifest, verify_image

__all__ = [
    "STEP_HANDLERS",
    "BuildContext",
    "ImageManifest",
    "build_image",
    "default_image",
    "load_manifest",
    "verify_image",
]
