"""An interactive map of a scene and its results: one self-contained web page (no server, no
network unless a basemap is asked), with similarity search computed in the page.

``dinov3_geo.explore(scene, *outputs)`` returns an :class:`Explorer` that shows itself in Jupyter
and writes the page with ``save(path)``; ``dinov3geo view SCENE [OUTPUTS...] -o page.html`` does
the same from the command line. Modules: :mod:`.grid` (where pixels lie and the grid the page
draws on), :mod:`.layers` (what each file is and how it is drawn), :mod:`.render` (images and
legends), :mod:`.vectors` (vector layers), :mod:`.similarity` (the feature map for the page),
:mod:`.page` (the HTML file with the vendored Leaflet and proj4js), :mod:`.explorer` (the call).
"""
from dinov3_geo.explorer.explorer import COMPONENTS, MAX_SIDE, Explorer, explore
from dinov3_geo.explorer.similarity import PageFeatures

__all__ = ["explore", "Explorer", "PageFeatures", "MAX_SIDE", "COMPONENTS"]
