/* dinov3-geo explorer: the map of one scene and its results, with similarity search on click.
   Everything the page shows is in #explore-data (JSON written by dinov3_geo.explore); nothing is
   fetched. window.dinov3geo exposes the map, the layers and the similarity for scripts and tests. */
(function () {
  "use strict";

  var D = JSON.parse(document.getElementById("explore-data").textContent);
  var api = window.dinov3geo = { data: D, layers: {}, ready: false };

  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function fmt(v, digits) {
    return v === null || v === undefined || isNaN(v) ? "–" : Number(v).toFixed(digits);
  }

  // -- the map's coordinates --------------------------------------------------------------------
  /* Without a basemap the map is in the scene's own CRS (x = lng, y = lat; zoom 0: one screen
     pixel per display pixel), so rasters on the scene's grid are placed exactly; with one it is
     Web Mercator and the rasters were warped to it. */
  function pageCrs(d) {
    if (d.basemap) return L.CRS.EPSG3857;
    var s = 1 / d.pixel, metres = d.metres_per_unit || 1;
    return L.extend({}, L.CRS.Simple, {
      transformation: new L.Transformation(s, -d.origin[0] * s, -s, d.origin[1] * s),
      R: 6371000,
      distance: d.geographic ? L.CRS.Earth.distance : function (a, b) {
        return Math.sqrt(Math.pow(b.lng - a.lng, 2) + Math.pow(b.lat - a.lat, 2)) * metres;
      },
      infinite: true
    });
  }

  var crs = pageCrs(D.display);
  var map = L.map("map", {
    crs: crs, minZoom: D.display.min_zoom, maxZoom: D.display.max_zoom, zoomSnap: 0.25,
    attributionControl: true
  });
  map.attributionControl.setPrefix("dinov3-geo · Leaflet");
  map.fitBounds(D.display.bounds);
  api.map = map;

  /* display-CRS coordinates <-> the map's LatLng */
  function toLatLng(x, y) { return crs.unproject(L.point(x, y)); }
  function fromLatLng(latlng) { return crs.project(latlng); }
  api.toLatLng = toLatLng;
  api.toPage = function (x, y) {
    var p = map.latLngToContainerPoint(toLatLng(x, y)), box = map.getContainer().getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  };

  var digits = D.scene.geographic ? 6 : 2;
  var lonlat = null;             // scene CRS -> longitude, latitude (proj4js)
  try { if (D.scene.proj4) lonlat = proj4(D.scene.proj4, "WGS84"); } catch (e) { lonlat = null; }  // no lon/lat then

  /* (scene x, y, lon, lat) of a display-CRS point */
  function places(p) {
    if (D.display.basemap) {
      var ll = crs.unproject(p), xy = lonlat ? lonlat.inverse([ll.lng, ll.lat]) : [NaN, NaN];
      return { x: xy[0], y: xy[1], lon: ll.lng, lat: ll.lat };
    }
    var g = lonlat ? lonlat.forward([p.x, p.y]) : [NaN, NaN];
    return { x: p.x, y: p.y, lon: g[0], lat: g[1] };
  }

  function scenePixel(x, y) {
    var t = D.scene.pixel_transform;
    if (!t) return null;
    var det = t[0] * t[4] - t[1] * t[3], dx = x - t[2], dy = y - t[5];
    return { col: (t[4] * dx - t[1] * dy) / det, row: (t[0] * dy - t[3] * dx) / det };
  }

  // -- layers -----------------------------------------------------------------------------------
  var BLANK = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

  function popup(name, props) {
    var rows = Object.keys(props).map(function (k) {
      var v = props[k];
      if (typeof v === "number" && !Number.isInteger(v)) v = Number(v.toPrecision(6));
      return "<tr><td>" + esc(k) + "</td><td>" + esc(v === null ? "" : v) + "</td></tr>";
    });
    return '<div class="dg-popup"><b>' + esc(name) + "</b><table>" + rows.join("") + "</table></div>";
  }

  function vectorLayer(l) {
    var st = l.style;
    function colour(f) { return st.by ? (st.colours[String(f.properties[st.by])] || st.colour) : st.colour; }
    return L.geoJSON(l.geojson, {
      style: function (f) {
        var c = colour(f);
        return { color: c, weight: 1.5, opacity: 1, fillColor: c, fillOpacity: st.by ? 0.45 : 0.15 };
      },
      pointToLayer: function (f, latlng) { return L.circleMarker(latlng, { radius: 4 }); },
      onEachFeature: function (f, layer) { layer.bindPopup(popup(l.name, f.properties || {})); }
    });
  }

  function setOpacity(l, layer, v) {
    if (l.type === "vector") layer.setStyle({ opacity: v, fillOpacity: v * (l.style.by ? 0.45 : 0.15) });
    else layer.setOpacity(v);
  }

  var overlays = {}, baseLayers = {};
  if (D.basemap) {
    baseLayers[esc(D.basemap.name)] = L.tileLayer(D.basemap.url, {
      attribution: D.basemap.attribution, maxNativeZoom: D.basemap.max_zoom, maxZoom: D.display.max_zoom
    }).addTo(map);
    baseLayers["none"] = L.layerGroup();
  }
  D.layers.forEach(function (l) {
    var layer = l.type === "vector" ? vectorLayer(l)
      : L.imageOverlay(l.url, l.bounds, { opacity: l.opacity, className: l.pixelated ? "dg-pixelated" : "" });
    api.layers[l.name] = layer;
    overlays[esc(l.name)] = layer;
    if (l.visible) layer.addTo(map);
  });

  // -- similarity on click ----------------------------------------------------------------------
  function bytes(b64) {
    var bin = atob(b64), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function halfFloats() {          // every half float's value (all exact in float32)
    var t = new Float32Array(65536);
    for (var h = 0; h < 65536; h++) {
      var s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      t[h] = e === 0 ? s * f * Math.pow(2, -24) : e === 31 ? (f ? NaN : s * Infinity)
        : s * (1 + f / 1024) * Math.pow(2, e - 15);
    }
    return t;
  }

  /* Cosine similarity as dinov3_geo.similar computes it: every cell scaled to unit length (the
     norm in double precision, the result rounded to float32), then the dot product with the
     clicked cell's unit vector, rounded to float32. */
  function Similarity(S) {
    var K = S.components, n = S.width * S.height, half = halfFloats();
    var raw = new Uint16Array(bytes(S.values).buffer), unit = new Float32Array(n * K);
    for (var i = 0; i < n; i++) {
      var o = i * K, s = 0, k;
      for (k = 0; k < K; k++) s += half[raw[o + k]] * half[raw[o + k]];
      var norm = Math.sqrt(s), d = norm > 0 ? norm : 1;
      for (k = 0; k < K; k++) unit[o + k] = half[raw[o + k]] / d;
    }
    var lookup = S.lookup ? new Int32Array(bytes(S.lookup.index).buffer) : null;
    var gw = S.lookup ? S.lookup.width : S.width, gh = S.lookup ? S.lookup.height : S.height;
    var values = new Float32Array(n).fill(NaN);
    var canvas = document.createElement("canvas");
    canvas.width = gw; canvas.height = gh;
    var overlay = L.imageOverlay(BLANK, S.bounds, { opacity: 0.85, className: "dg-pixelated dinov3-similarity" });
    var self = { layer: overlay, values: values, reference: -1, threshold: -1, status: null };

    /* the cell under a display-CRS point: the scene pixel under it, then its cell (as `similar
       --at` finds it), or the lookup's cell where the page is not on the scene's grid */
    self.cellAt = function (x, y) {
      if (!lookup) {
        var t = S.pixel_transform, col = Math.floor((x - t[2]) / t[0]), row = Math.floor((y - t[5]) / t[4]);
        if (col < 0 || row < 0 || col >= S.scene_size[0] || row >= S.scene_size[1]) return -1;
        return Math.floor(row / S.cell_px) * S.width + Math.floor(col / S.cell_px);
      }
      var lk = S.lookup, j = Math.floor((x - lk.origin[0]) / lk.pixel[0]), r = Math.floor((lk.origin[1] - y) / lk.pixel[1]);
      if (j < 0 || r < 0 || j >= gw || r >= gh) return -1;
      return lookup[r * gw + j];
    };
    self.valueAt = function (x, y) {
      var c = self.cellAt(x, y);
      return c < 0 || self.reference < 0 || isNaN(values[c]) ? null : values[c];
    };

    self.draw = function () {
      var ctx = canvas.getContext("2d"), img = ctx.createImageData(gw, gh), px = img.data, t = self.threshold;
      for (var p = 0; p < gw * gh; p++) {
        var c = lookup ? lookup[p] : p, v = c >= 0 ? values[c] : NaN;
        if (!(v >= t)) continue;                    // NaN, outside, or under the threshold
        var rgba = S.colours[Math.min(254, Math.max(0, Math.round((v + 1) / 2 * 254)))];
        px[4 * p] = rgba[0]; px[4 * p + 1] = rgba[1]; px[4 * p + 2] = rgba[2]; px[4 * p + 3] = rgba[3];
      }
      ctx.putImageData(img, 0, 0);
      overlay.setUrl(self.reference < 0 ? BLANK : canvas.toDataURL("image/png"));
    };

    self.select = function (x, y) {
      var c = self.cellAt(x, y);
      if (c < 0 || isNaN(unit[c * K])) {
        self.setStatus(c < 0 ? "outside the feature map" : "no data in this cell");
        return false;
      }
      var ref = unit.subarray(c * K, c * K + K);
      for (var i = 0; i < n; i++) {
        var o = i * K, s = 0;
        for (var k = 0; k < K; k++) s += ref[k] * unit[o + k];
        values[i] = s;
      }
      self.reference = c;
      var at = places(L.point(x, y)), px = scenePixel(at.x, at.y);
      self.setStatus("reference: cell row " + Math.floor(c / S.width) + ", column " + (c % S.width) + " (" +
                     (D.scene.crs_name ? "x " + fmt(at.x, digits) + ", y " + fmt(at.y, digits)
                       : "pixel column " + Math.floor(px.col) + ", row " + Math.floor(px.row)) + ")");
      if (self.marker) self.marker.setLatLng(toLatLng(x, y));
      else self.marker = L.circleMarker(toLatLng(x, y), { radius: 5, color: "#00e5ff", weight: 2, fill: false,
                                                          interactive: false }).addTo(map);
      self.draw();
      return true;
    };
    self.setStatus = function (text) { if (self.status) self.status.textContent = text; };
    return self;
  }

  var sim = null;
  if (D.similarity) {
    sim = Similarity(D.similarity);
    api.similarity = sim;
    api.layers[D.similarity.name] = sim.layer;
    overlays[esc(D.similarity.name)] = sim.layer;
    sim.layer.addTo(map);
    map.on("click", function (e) {
      if (!map.hasLayer(sim.layer)) return;
      var p = fromLatLng(e.latlng);
      sim.select(p.x, p.y);
    });
  }

  api.switcher = L.control.layers(baseLayers, overlays, { collapsed: true, position: "topright" }).addTo(map);

  // -- legends, opacity, threshold ----------------------------------------------------------------
  function legendHtml(g) {
    if (!g) return "";
    if (g.kind === "ramp") {
      var units = g.units ? " " + esc(g.units) : "";
      return '<div class="dg-ramp" style="background: linear-gradient(to right, ' + g.colours.join(", ") +
        ')"></div><div class="dg-ramp-labels"><span>' + esc(Number(g.min.toPrecision(4))) + units + "</span><span>" +
        esc(g.label) + "</span><span>" + esc(Number(g.max.toPrecision(4))) + units + "</span></div>";
    }
    if (g.kind === "classes") {
      return (g.label ? "<div>" + esc(g.label) + "</div>" : "") + g.items.map(function (it) {
        return '<div class="dg-item"><span class="dg-swatch" style="background:' + esc(it.colour) + '"></span>' +
          esc(it.name) + "</div>";
      }).join("");
    }
    if (g.kind === "vector") {
      return '<div class="dg-item"><span class="dg-swatch" style="border:2px solid ' + esc(g.colour) +
        '"></span>' + esc(g.label) + "</div>";
    }
    return "<div>" + esc(g.text || g.label || "") + "</div>";
  }

  function opacityInput(value, onInput) {
    var label = L.DomUtil.create("label", "dg-opacity");
    label.innerHTML = "opacity ";
    var input = L.DomUtil.create("input", "", label);
    input.type = "range"; input.min = 0; input.max = 1; input.step = 0.05; input.value = value;
    input.addEventListener("input", function () { onInput(Number(input.value)); });
    return label;
  }

  var Legends = L.Control.extend({
    options: { position: "bottomright" },
    onAdd: function () {
      var div = L.DomUtil.create("div", "dg-panel dg-legends");
      L.DomEvent.disableClickPropagation(div);
      L.DomEvent.disableScrollPropagation(div);
      var entries = D.layers.slice();
      if (D.similarity) entries.push(D.similarity);
      entries.forEach(function (l) {
        var box = L.DomUtil.create("div", "dg-legend", div), layer = api.layers[l.name];
        box.setAttribute("data-layer", l.name);
        box.innerHTML = "<h4>" + esc(l.name) + "</h4>" + legendHtml(l.legend);
        if (l.type === "similarity") {
          var status = L.DomUtil.create("div", "dg-status", box);
          status.textContent = "click the map: similarity of every cell to the clicked one";
          sim.status = status;
          var th = L.DomUtil.create("label", "dg-threshold", box);
          th.innerHTML = "show from ";
          var input = L.DomUtil.create("input", "", th), shown = L.DomUtil.create("span", "", th);
          input.type = "range"; input.min = -1; input.max = 1; input.step = 0.01; input.value = -1;
          shown.textContent = " -1.00";
          input.addEventListener("input", function () {
            sim.threshold = Number(input.value);
            shown.textContent = " " + sim.threshold.toFixed(2);
            sim.draw();
          });
          api.threshold = input;
          L.DomUtil.create("div", "dg-status", box).textContent = l.reduction;
        }
        box.appendChild(opacityInput(l.type === "similarity" ? 0.85 : (l.opacity || 1), function (v) {
          setOpacity(l, layer, v);
        }));
        if (!map.hasLayer(layer)) L.DomUtil.addClass(box, "dg-off");
      });
      map.on("overlayadd overlayremove", function (e) {
        div.querySelectorAll(".dg-legend").forEach(function (box) {
          if (api.layers[box.getAttribute("data-layer")] === e.layer) {
            L.DomUtil[e.type === "overlayadd" ? "removeClass" : "addClass"](box, "dg-off");
          }
        });
      });
      return div;
    }
  });
  new Legends().addTo(map);

  // -- coordinates, scale, notes ------------------------------------------------------------------
  var Coords = L.Control.extend({
    options: { position: "bottomleft" },
    onAdd: function () {
      var div = L.DomUtil.create("div", "dg-panel dg-coords");
      div.innerHTML = "move over the map";
      api.coords = div;
      return div;
    }
  });
  new Coords().addTo(map);
  map.on("mousemove", function (e) {
    var p = fromLatLng(e.latlng), at = places(p), lines = [];
    if (D.scene.crs_name) {
      lines.push("x " + fmt(at.x, digits) + "  y " + fmt(at.y, digits) + "  (" + esc(D.scene.crs_name) + ")");
      lines.push("lon " + fmt(at.lon, 6) + "  lat " + fmt(at.lat, 6));
    }
    var px = scenePixel(at.x, at.y);
    if (px) lines.push("pixel column " + Math.floor(px.col) + ", row " + Math.floor(px.row));
    if (sim && sim.reference >= 0) lines.push("similarity " + fmt(sim.valueAt(p.x, p.y), 4));
    api.coords.innerHTML = lines.join("<br>");
  });
  if (D.display.scale_bar) L.control.scale({ imperial: false, position: "bottomleft" }).addTo(map);

  var Notes = L.Control.extend({
    options: { position: "topleft" },
    onAdd: function () {
      var div = L.DomUtil.create("div", "dg-panel dg-notes");
      L.DomEvent.disableClickPropagation(div);
      div.innerHTML = "<details><summary>" + esc(D.title) + '</summary><ul>' +
        D.notes.map(function (t) { return "<li>" + esc(t) + "</li>"; }).join("") + "</ul></details>" +
        '<div class="dg-status">' + esc(D.headline) + "</div>";
      return div;
    }
  });
  new Notes().addTo(map);

  api.loadedMs = performance.now();       // since the page's navigation began
  api.ready = true;
})();
