"""Retrieval galleries as self-contained HTML: small embedded thumbnails, framed by relevance.

Each row shows the query and, per result, its top-k with a green (relevant) or red (not
relevant) frame, the rank and the cosine similarity under each image. Thumbnails are JPEGs
embedded as base64 ``data:`` URIs (nothing fetched, no file path in the page); each carries the
catalogue's ``data-item-id`` and ``data-sha256`` (the first 16 hex digits of the image file's
SHA-256), so anyone can check that every picture is the searched catalogue's. One
:class:`GalleryRenderer` bounds their total size across every gallery of a report: rows that
would pass the bound are left out, and the page says how many.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
from collections.abc import Iterable
from pathlib import Path

from embbench.analysis.gallery import Gallery, GalleryCell

logger = logging.getLogger(__name__)

RELEVANT = "#1a7f37"
WRONG = "#b42318"
QUERY = "#444444"


class GalleryRenderer:
    """Renders galleries to HTML within one size budget for the whole report.

    Args:
        max_mb: Bound on the HTML of every gallery rendered by this object (MB).
        thumb_px: Longest side of a thumbnail in pixels.
        quality: JPEG quality of the thumbnails.
    """

    def __init__(self, max_mb: float = 3.0, thumb_px: int = 64, quality: int = 70) -> None:
        self.max_bytes = int(max_mb * 1e6)
        self.thumb_px = int(thumb_px)
        self.quality = int(quality)
        self.used = 0
        self._thumbs: dict[str, str] = {}
        self._digests: dict[str, str] = {}

    @property
    def remaining(self) -> int:
        """Bytes left in the budget."""
        return max(0, self.max_bytes - self.used)

    def thumbnail(self, path: str) -> str:
        """The image at ``path`` as a ``data:image/jpeg;base64`` URI ("" when unreadable)."""
        if path not in self._thumbs:
            self._thumbs[path] = ""
            p = Path(path)
            if "://" not in path and p.is_file():
                try:
                    from PIL import Image

                    raw = p.read_bytes()
                    self._digests[path] = hashlib.sha256(raw).hexdigest()[:16]
                    with Image.open(io.BytesIO(raw)) as im:
                        im = im.convert("RGB")
                        im.thumbnail((self.thumb_px, self.thumb_px))
                        buf = io.BytesIO()
                        im.save(buf, format="JPEG", quality=self.quality, optimize=True)
                    data = base64.b64encode(buf.getvalue()).decode("ascii")
                    self._thumbs[path] = f"data:image/jpeg;base64,{data}"
                except OSError as exc:
                    logger.warning("gallery: cannot read %s (%s)", path, exc)
        return self._thumbs[path]

    def _cell(self, cell: GalleryCell, caption: str, colour: str, alt: str) -> str:
        px = self.thumb_px
        src = self.thumbnail(cell.path)
        box = f"width:{px}px;height:{px}px;border:3px solid {colour};display:block;margin:auto"
        if src:
            img = (
                f'<img class="embbench-thumb" src="{src}" alt="{html.escape(alt)}" '
                f'data-item-id="{html.escape(cell.item_id)}" '
                f'data-sha256="{self._digests.get(cell.path, "")}" '
                f'title="{html.escape(alt)}" style="{box};object-fit:contain;background:#fff">'
            )
        else:
            img = f'<div class="embbench-missing" style="{box};background:#ddd"></div>'
        return (
            f'<td style="padding:2px 3px;text-align:center;vertical-align:top">{img}'
            f'<div style="font-size:10px;line-height:1.2;color:#333">{caption}</div></td>'
        )

    def _row(self, gallery: Gallery, row) -> str:
        esc = html.escape
        q = row.query
        group = "" if row.group is None else f"{esc(str(row.group))}<br>"
        if q.path:
            head = self._cell(q, f"{group}<b>{esc(str(q.label))}</b>", QUERY, f"query: {q.label}")
        else:  # a text query: its text is the row header
            head = (
                '<th class="embbench-text-query" style="text-align:left;vertical-align:top;'
                f'max-width:180px;font-size:12px;padding:2px 6px">{esc(str(q.label))}'
                f'<div style="font-size:10px;color:#555;font-weight:normal">{group}</div></th>'
            )
        parts = ["<tr>", head]
        for entry in gallery.entries:
            cells = row.results.get(entry, [])
            parts.append('<td style="width:8px"></td>')
            for c in cells:
                ok = bool(c.relevant)
                alt = (
                    f"{entry}: rank {c.rank}, similarity {c.score:.3f}, "
                    f"{'relevant' if ok else 'not relevant'} ({c.label})"
                )
                caption = f"#{c.rank}" if c.score != c.score else f"#{c.rank} · {c.score:.3f}"
                parts.append(self._cell(c, caption, RELEVANT if ok else WRONG, alt))
            parts += ["<td></td>"] * (gallery.k - len(cells))
        parts.append("</tr>")
        return "".join(parts)

    def render(self, galleries: Iterable[Gallery], *, share: float = 1.0) -> str:
        """The HTML of ``galleries``, using at most ``share`` of the whole budget.

        Rows beyond the budget are left out and counted in a note.
        """
        galleries = list(galleries)
        limit = min(self.remaining, int(share * self.max_bytes))
        out, size, skipped = [], 0, 0
        esc = html.escape
        for g in galleries:
            out += [f"<p><i>{esc(g.dataset)}: {esc(n)}</i></p>" for n in g.notes]
            if not g.rows:
                continue
            ncol = 1 + len(g.entries) * (g.k + 1)
            head = [
                f'<div class="embbench-gallery"><h4>{esc(g.dataset)}: relevance = same '
                f"{esc(g.label)}; rows grouped by {esc(g.group_label)}</h4>",
                '<table style="border-collapse:collapse;table-layout:fixed">',
                "<tr><th>query</th>"
                + "".join(
                    f'<th></th><th colspan="{g.k}" style="text-align:center">{esc(e)}'
                    + (
                        f"<br><small>same top-{g.k}: {esc(', '.join(g.same_as[e]))}</small>"
                        if g.same_as.get(e)
                        else ""
                    )
                    + "</th>"
                    for e in g.entries
                )
                + "</tr>",
            ]
            body, section = [], None
            for row in g.rows:
                chunk = ""
                if row.section != section:
                    section = row.section
                    title = g.sections.get(section, section)
                    chunk += (
                        f'<tr><td colspan="{ncol}" style="text-align:left;padding-top:8px">'
                        f"<b>{esc(title)}</b></td></tr>"
                    )
                chunk += self._row(g, row)
                if size + len(chunk) > limit:
                    skipped += 1
                    continue
                size += len(chunk)
                body.append(chunk)
            out += [*head, *body, "</table></div>"]
        if skipped:
            out.append(
                f"<p><i>{skipped} gallery row(s) left out to keep the report within "
                f"gallery_max_mb = {self.max_bytes / 1e6:g} MB.</i></p>"
            )
        legend = (
            f'<p style="font-size:11px">Frame: <span style="color:{RELEVANT}">green</span> = '
            f'relevant, <span style="color:{WRONG}">red</span> = not relevant; under each '
            "result: rank · cosine similarity.</p>"
        )
        text = legend + "".join(out)
        self.used += len(text)
        return text


def show_gallery(
    galleries: Gallery | Iterable[Gallery],
    renderer: GalleryRenderer | None = None,
    *,
    share: float = 1.0,
    empty: str = "No gallery: the runs' cached embeddings or catalogue are not on this machine.",
) -> None:
    """Display galleries (HTML) in a notebook; a note when there is none."""
    from IPython.display import HTML, Markdown, display

    items = [galleries] if isinstance(galleries, Gallery) else list(galleries)
    if not any(g.rows for g in items):  # why not, one line per reason, never a picture
        lines = [f"{g.dataset}: {n}" for g in items for n in g.notes] or [empty]
        display(Markdown("\n\n".join(f"*{line}*" for line in lines)))
        return
    display(HTML((renderer or GalleryRenderer()).render(items, share=share)))
