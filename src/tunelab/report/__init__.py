"""Reports: a self-contained HTML page and a JSON file with the same data.

See :mod:`tunelab.report.html` for the report dict schema.
"""

from tunelab.report.html import (
    MAX_EXAMPLES,
    collect_environment,
    render_html,
    to_jsonable,
    write_report,
)

__all__ = ["MAX_EXAMPLES", "collect_environment", "render_html", "to_jsonable", "write_report"]
