// The status page: polls the scheduler's api/overview (same origin) and draws it.
// Plain DOM and inline SVG, no library: the page must work where the CDN runs, offline.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STATES = ["up", "overloaded", "down", "unknown"];
let pollEvery = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  setAttrs(node, attrs);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
}

function stateOf(state) {
  return STATES.includes(state) ? state : "unknown";
}

function rate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function percent(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%";
}

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return (value >= 10 || i === 0 ? value.toFixed(0) : value.toFixed(1)) + " " + units[i];
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

// A sparkline over the kept window: x is time (the whole window, so gaps show), y from 0 to `top`.
// A null value (no lookups in that interval, for a ratio) breaks the line.
function chart(kind, times, values, start, end, top) {
  const width = 250, height = 44;
  const box = svg("svg", { class: "chart " + kind, viewBox: `0 0 ${width} ${height}`,
                           preserveAspectRatio: "none", "data-chart": kind,
                           "data-points": values.filter((v) => v !== null).length });
  const peak = top !== null ? top : Math.max(1e-9, ...values.filter((v) => v !== null));
  let run = [];
  const flush = () => {
    if (run.length > 1) box.append(svg("polyline", { points: run.join(" ") }));
    run = [];
  };
  times.forEach((t, i) => {
    const v = values[i];
    if (v === null) { flush(); return; }
    const x = ((t - start) / Math.max(1, end - start)) * width;
    const y = height - 2 - (Math.min(v, peak) / peak) * (height - 4);
    run.push(x.toFixed(1) + "," + y.toFixed(1));
  });
  flush();
  return box;
}

// ------------------------------------------------------------------ the map

// Equirectangular: longitude and latitude as x and y, over the box that holds every
// region and node (padded), degrees square.
function drawMap(doc) {
  const map = document.getElementById("map");
  const points = [...doc.regions, ...doc.nodes].filter((p) => p.lat !== null && p.lon !== null);
  const lats = points.map((p) => p.lat), lons = points.map((p) => p.lon);
  let [south, north] = [Math.min(...lats, 0), Math.max(...lats, 0)];
  let [west, east] = [Math.min(...lons, 0), Math.max(...lons, 0)];
  if (points.length) {
    [south, north, west, east] = [Math.min(...lats), Math.max(...lats), Math.min(...lons), Math.max(...lons)];
  }
  const padLon = Math.max(8, (east - west) * 0.2), padLat = Math.max(6, (north - south) * 0.3);
  west -= padLon; east += padLon; south -= padLat; north += padLat;
  const width = 900, scale = width / (east - west);
  const height = Math.max(240, (north - south) * scale);
  const middle = (north + south) / 2;
  north = middle + height / scale / 2; south = middle - height / scale / 2;
  const x = (lon) => (lon - west) * scale, y = (lat) => (north - lat) * scale;
  map.setAttribute("viewBox", `0 0 ${width} ${height.toFixed(0)}`);
  const layers = [];
  const step = (east - west) > 120 ? 30 : 10;
  for (let lon = Math.ceil(west / step) * step; lon <= east; lon += step) {
    layers.push(svg("line", { class: "graticule", x1: x(lon), x2: x(lon), y1: 0, y2: height }));
  }
  for (let lat = Math.ceil(south / step) * step; lat <= north; lat += step) {
    layers.push(svg("line", { class: "graticule", x1: 0, x2: width, y1: y(lat), y2: y(lat) }));
  }
  for (const region of doc.regions) {
    layers.push(svg("circle", { class: "region", cx: x(region.lon), cy: y(region.lat), r: 34 }));
    layers.push(svg("text", { class: "region-label", x: x(region.lon), y: y(region.lat) + 52,
                              "text-anchor": "middle" }, region.name));
  }
  // Nodes at the same place are spread on a small ring around it.
  const byPlace = new Map();
  for (const node of doc.nodes) {
    if (node.lat === null || node.lon === null) continue;
    const key = node.lat + "," + node.lon;
    if (!byPlace.has(key)) byPlace.set(key, []);
    byPlace.get(key).push(node);
  }
  const where = new Map();
  for (const group of byPlace.values()) {
    group.forEach((node, i) => {
      const angle = (2 * Math.PI * i) / group.length - Math.PI / 2;
      const ring = group.length > 1 ? 20 : 0;
      where.set(node.name, [x(node.lon) + ring * Math.cos(angle), y(node.lat) + ring * Math.sin(angle)]);
    });
  }
  for (const node of doc.nodes) {
    for (const parent of node.parents) {
      if (where.has(node.name) && where.has(parent)) {
        const [x1, y1] = where.get(node.name), [x2, y2] = where.get(parent);
        layers.push(svg("line", { class: "link", x1, y1, x2, y2 }));
      }
    }
  }
  // Nodes placed nowhere (the origin, an L2 without a region) in a row along the bottom.
  const unplaced = doc.nodes.filter((node) => !where.has(node.name));
  if (unplaced.length) {
    layers.push(svg("text", { class: "region-label", x: 12, y: height - 14 }, "not placed:"));
    unplaced.forEach((node, i) => where.set(node.name, [110 + i * 110, height - 18]));
  }
  for (const node of doc.nodes) {
    const [cx, cy] = where.get(node.name);
    const state = stateOf(node.state);
    const title = svg("title", {}, `${node.name} (${node.role}): ${state}, ${node.detail}`);
    const dot = node.role === "l1" ? svg("circle", { cx, cy, r: 9 }, title)
      : node.role === "origin" ? svg("polygon", { points: `${cx},${cy - 10} ${cx + 10},${cy} ${cx},${cy + 10} ${cx - 10},${cy}` }, title)
      : svg("rect", { x: cx - 8, y: cy - 8, width: 16, height: 16 }, title);
    setAttrs(dot, { class: "dot state-" + state, "data-node": node.name, "data-state": state });
    layers.push(dot);
    layers.push(svg("text", { class: "node-label", x: cx + 12, y: cy + 4 }, node.name));
  }
  map.replaceChildren(...layers);
}

// ------------------------------------------------------------------ nodes, sites, answers

function nodeCard(node, start, end) {
  const state = stateOf(node.state);
  const now = node.now;
  const isOrigin = node.role === "origin";
  const problems = [node.detail, node.metrics_error].filter((p) => p);
  return el("article", { class: "card node state-" + state, "data-node": node.name, "data-state": state,
                         "data-rps": now.rps, "data-hit-ratio": now.hit_ratio },
    el("h3", {}, node.name, el("span", { class: "muted" }, node.role + (node.region ? " · " + node.region : "")),
       el("span", { class: "pill" }, state)),
    el("p", { class: "detail" }, problems.join(" · ")),
    el("div", { class: "figures" },
       el("span", {}, el("b", {}, rate(now.rps)), " req/s"),
       isOrigin ? null : el("span", {}, el("b", {}, percent(now.hit_ratio)), " hits"),
       isOrigin ? null : el("span", {}, el("b", {}, bytes(now.bytes_per_s)), "/s")),
    el("div", { class: "chart-label" }, "requests/s"),
    chart("rps", node.series.t, node.series.rps, start, end, null),
    isOrigin ? null : el("div", { class: "chart-label" }, "hit ratio (0–100%)"),
    isOrigin ? null : chart("hit_ratio", node.series.t, node.series.hit_ratio, start, end, 1));
}

function siteRow(site, start, end) {
  return el("tr", { "data-site": site.name },
    el("td", {}, site.name),
    el("td", {}, site.hosts.join(", ")),
    el("td", { class: "num" }, rate(site.now.rps)),
    el("td", { class: "num" }, percent(site.now.hit_ratio)),
    el("td", { class: "num" }, bytes(site.now.bytes_per_s)),
    el("td", {}, chart("rps", site.series.t, site.series.rps, start, end, null)));
}

function answersCard(region) {
  const name = region.region === null ? "no region" : region.region;
  const rows = region.answers.map((a) => el("tr", {},
    el("td", {}, clock(a.at)), el("td", {}, a.name), el("td", {}, a.client + (a.via === "ecs" ? " (ECS)" : "")),
    el("td", { class: a.all_down ? "all-down" : "" }, a.edges.join(" → ") + (a.all_down ? " (all down)" : ""))));
  return el("article", { class: "card answers", "data-region": name },
    el("h3", {}, name),
    rows.length ? el("table", {}, el("tbody", {}, ...rows)) : el("p", { class: "muted" }, "no answers yet"));
}

function draw(doc) {
  const end = doc.generated, start = end - doc.history_seconds;
  drawMap(doc);
  document.getElementById("nodes").replaceChildren(...doc.nodes.map((n) => nodeCard(n, start, end)));
  document.querySelector("#sites tbody").replaceChildren(...doc.sites.map((s) => siteRow(s, start, end)));
  document.getElementById("answers").replaceChildren(...doc.answers.map(answersCard));
  document.getElementById("window").textContent =
    `(charts: the last ${Math.round(doc.history_seconds / 60)} minutes; figures: the last ${doc.recent_seconds} s)`;
  document.getElementById("updated").textContent = "updated " + clock(doc.generated);
  document.body.dataset.generated = String(doc.generated);
}

async function poll() {
  const problem = document.getElementById("problem");
  try {
    const reply = await fetch("api/overview", { cache: "no-store" });
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    const doc = await reply.json();
    pollEvery = Math.max(1000, doc.interval * 1000);
    draw(doc);
    problem.hidden = true;
  } catch (error) {
    // The scheduler itself is unreachable: say so, keep the last picture, keep trying.
    problem.textContent = "scheduler unreachable: " + error.message;
    problem.hidden = false;
  }
  setTimeout(poll, pollEvery);
}

poll();
