"""An interactive map of a scene and its results: one self-contained web page (no server, no
network unless a basemap is asked), with similarity search computed in the page.

``dinov3_geo.explore(scene, *outputs)`` returns an :class:`Explorer` that shows itself in Jupyter
and writes the page with ``save(path)``; ``dinov3geo view SCENE [OUTPUTS...] -o page.html`` does
the same from the command line. Modules: :mod:`.grid` (where pixels lie and the grid the page
draws on), :mod:`.layers` (what each file is and how it is drawn), :mod:`.render` (images and
legends), :mod:`.vectors` (vector layers), :mod:`.similarity` (the feature map for the page),
:mod:`.page` (the HTML file with the vendored Leaflet and proj4js), :mod:`.explorer` (the call).
"""
import sys
import types

from dinov3_geo.explore.explorer import COMPONENTS, MAX_SIDE, Explorer, explore
from dinov3_geo.explore.similarity import PageFeatures

__all__ = ["explore", "Explorer", "PageFeatures", "MAX_SIDE", "COMPONENTS"]


class _CallableModule(types.ModuleType):
    """``dinov3_geo.explore`` is this package once any of its modules was imported (Python binds a
    package's submodules to it), and the function before: calling either makes the page."""

    def __call__(self, *args, **kwargs) -> Explorer:
        return explore(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
