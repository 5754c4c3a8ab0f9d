"""The page: one HTML file holding the vendored map libraries (Leaflet, proj4js), the page's own
script and style, and its data (JSON), with a Content-Security-Policy that lets it load nothing
but what it holds (and, with a basemap, the tiles of that one server)."""
from __future__ import annotations

import base64
import html
import json
import re
from functools import cache
from importlib import resources
from string import Template

from dinov3_geo import __version__

#: The online basemap, only when asked.
BASEMAP = {"name": "OpenStreetMap", "url": "https://tile.openstreetmap.org/{z}/{x}/{y}.png",
           "origin": "https://tile.openstreetmap.org", "max_zoom": 19,
           "attribution": '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'}


@cache
def _asset(path: str) -> bytes:
    return resources.files("dinov3_geo.explorer").joinpath(path).read_bytes()


def _text(path: str) -> str:
    return _asset(path).decode("utf-8")


def leaflet_css() -> str:
    """Leaflet's style sheet with its images as data URIs (no file beside the page)."""
    def inline(match: re.Match) -> str:
        raw = _asset(f"vendor/leaflet/images/{match.group(1)}")
        return f"url(data:image/png;base64,{base64.b64encode(raw).decode('ascii')})"

    return re.sub(r"url\(images/([\w.-]+\.png)\)", inline, _text("vendor/leaflet/leaflet.css"))


def leaflet_js() -> str:
    """Leaflet without its source-map comment (a developer tool would fetch the map)."""
    return re.sub(r"^//# sourceMappingURL=.*$", "", _text("vendor/leaflet/leaflet.js"), flags=re.M)


def script_json(data: dict) -> str:
    """``data`` as JSON safe inside a ``<script>`` element (no ``<``, so no ``</script>``)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def build(title: str, data: dict, basemap: bool) -> str:
    """The whole page."""
    return Template(_text("static/page.html")).substitute(
        title=html.escape(title), version=__version__, tiles=BASEMAP["origin"] if basemap else "",
        leaflet_css=leaflet_css(), page_css=_text("static/page.css"), leaflet_js=leaflet_js(),
        proj4_js=_text("vendor/proj4/proj4.js"), data=script_json(data), page_js=_text("static/page.js"))
