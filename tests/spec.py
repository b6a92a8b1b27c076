"""What the tests pin from SPEC.md, written out here (never taken from the code,
so a test that compares the code against it can fail)."""

# SPEC 4: the steps of a successful upgrade, in report order (plan is local, not a step)
SPEC_STEPS = (
    "preflight",
    "tunnel",
    "ssh",
    "lock",
    "inspect",
    "stage",
    "open_window",
    "swap",
    "first_life",
    "close_window",
    "soak",
    "commit",
    "cleanup",
)
