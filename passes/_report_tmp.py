"""TEMPORARY (until report.py lands)."""
import dataclasses

@dataclasses.dataclass
class Site:
    """One rewritten site or near miss."""

    node: str
    source: str
    rewritten: bool
    reason: str = ""
    decay: str = ""
    scale: object = None

    def __str__(self):
        head = f"{'rewritten' if self.rewritten else 'left alone'}: {self.node}"
        if self.source:
            head += f" at {self.source}"
        if self.rewritten:
            return f"{head}\n    log_decay = {self.decay}; scale = {self.scale}"
        return f"{head}\n    reason: {self.reason}"


@dataclasses.dataclass
class RewriteReport:
    """What :func:`rewrite_decay_attention` did: ``rewrites`` and ``near_misses``."""

    rewrites: list = dataclasses.field(default_factory=list)
    near_misses: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"leet decay-attention pass: {len(self.rewrites)} rewritten, "
                 f"{len(self.near_misses)} left alone"]
        lines += ["  " + str(s).replace("\n", "\n  ") for s in self.rewrites + self.near_misses]
        return "\n".join(lines)

    def extend(self, other):
        self.rewrites += other.rewrites
        self.near_misses += other.near_misses


def source_of(n):
    """'file:line: code' of a node's innermost user frame, from its stack trace."""
    st = n.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in st.strip().splitlines()]
    for k in range(len(lines) - 1, -1, -1):
        if lines[k].startswith("File "):
            loc = lines[k]
            code = lines[k + 1] if k + 1 < len(lines) and not lines[k + 1].startswith("File ") else ""
            try:
                fname = loc.split('"')[1]
                line = loc.split("line ")[1].split(",")[0]
                loc = f"{fname}:{line}"
            except IndexError:
                pass
            return f"{loc}: {code}" if code else loc
    return ""


