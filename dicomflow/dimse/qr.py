"""Query/Retrieve SCP handlers (C-FIND, C-MOVE, C-GET; PS3.4 Annex C).

Stub owned by the query/retrieve engineer: server.py binds whatever :func:`handlers` returns, and
already accepts the Patient Root / Study Root FIND, MOVE and GET presentation contexts (and the
storage contexts with both roles, for C-GET sub-operations; see sop_classes.py).
"""

from __future__ import annotations

from dicomflow.dimse.bridge import DimseContext, EventHandler


def handlers(ctx: DimseContext) -> list[EventHandler]:
    """``(event, handler)`` pairs for EVT_C_FIND / EVT_C_MOVE / EVT_C_GET, bound to ``ctx``."""
    return []
