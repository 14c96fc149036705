"""The local lab: real Debian kernels booted in qemu guests, reachable over SSH on loopback.

Machines without module support (this one, CI) can only load a probe inside a guest. The
guest is built from this machine's own Debian packages, so its kernel is exactly the one
``stap -r RELEASE`` compiles against. Under emulation (no KVM) a guest boots to SSH in
about 6–40 s, depending on the machine's load.

``image`` builds what the guests boot; ``guests`` holds ``Lab``, one lab folder with its
guests' lifecycle: ``Lab.default().up(3)``, ``.status()``, ``.down()``.
"""

from stapctl.lab.guests import Guest, GuestState, Lab, LabStatus
from stapctl.lab.image import guest_release

__all__ = ["Guest", "GuestState", "Lab", "LabStatus", "guest_release"]
