// Circuit Atlas page: a hash-routed view over the read-only API under /api. No outside assets.
// Everything from the atlas is inserted as text (textContent), never as HTML; the circuit SVG
// (drawn by the server) is parsed as XML and stripped of scripts and event attributes first.
"use strict";

const view = () => document.getElementById("view");

// ------------------------------------------------------------------ small DOM helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : v.toPrecision(4);
  }
  if (Array.isArray(v)) return v.map(fmt).join(v.length && typeof v[0] === "string" ? " → " : ", ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function shortText(s, n) {
  s = String(s ?? "");
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && String(v).trim() !== "") u.set(k, v);
  const s = u.toString();
  return s ? "?" + s : "";
}

async function api(path, params) {
  const res = await fetch("/api" + path + qs(params || {}), { headers: { Accept: "application/json" } });
  let body;
  try { body = await res.json(); } catch (e) { body = { error: `HTTP ${res.status}` }; }
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

// replaceChildren without the null / undefined of optional parts
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function errorBox(err) {
  return el("div", { class: "error", role: "alert", text: String(err.message || err) });
}

// A table of rows; columns: [key, title?] or {key, title, render(row) -> Node|string}
function table(rows, columns, opts) {
  opts = opts || {};
  if (!rows || rows.length === 0) return el("p", { class: "muted empty", text: opts.empty || "(no rows)" });
  const cols = columns || Object.keys(rows[0]).map((k) => ({ key: k }));
  const norm = cols.map((c) => (typeof c === "string" ? { key: c } : Array.isArray(c) ? { key: c[0], title: c[1] } : c));
  const head = el("tr", {}, norm.map((c) => el("th", { text: c.title || c.key })));
  const body = rows.map((r) => {
    const tr = el("tr", { class: opts.onClick ? "clickable " + (opts.rowClass || "") : opts.rowClass || "" });
    if (opts.onClick) tr.addEventListener("click", () => opts.onClick(r));
    for (const c of norm) {
      const v = c.render ? c.render(r) : fmt(r[c.key]);
      const numeric = typeof r[c.key] === "number" && !c.render;
      tr.append(el("td", { class: numeric ? "num" : "" }, v instanceof Node ? v : shortText(v, c.max || 200)));
    }
    return tr;
  });
  return el("table", { id: opts.id }, el("thead", {}, head), el("tbody", {}, body));
}

// a global feature id "<tset>/<layer>/<index>" as a link to its page
function fidLink(r) {
  const fid = String(r.neighbour ?? r.fid ?? "");
  const m = fid.match(/\/(\d+)\/(\d+)$/);
  return m ? link(`${m[1]}/${m[2]}`, `#/feature/${m[1]}/${m[2]}`) : fid;
}

function link(text, hash) {
  return el("a", { class: "link", href: hash, text, onclick: (e) => e.stopPropagation() });
}

function promptLink(id, text) { return link(text || id.slice(0, 12), `#/prompt/${id}`); }

function featureLink(r) {
  const layer = r.layer ?? r.f_layer;
  const index = r.index ?? r.feature;
  return link(`${layer}/${index}`, `#/feature/${layer}/${index}`);
}

// ------------------------------------------------------------------ routing
const routes = [
  [/^#\/prompts$/, () => promptsView()],
  [/^#\/prompt\/([0-9a-f]+)$/, (m) => promptView(m[1])],
  [/^#\/features$/, () => featuresView()],
  [/^#\/feature\/(\d+)\/(\d+)$/, (m) => featureView(m[1], m[2])],
  [/^#\/supernodes$/, () => supernodesView()],
  [/^#\/supernode\/(.+)$/, (m) => supernodeView(decodeURIComponent(m[1]))],
  [/^#\/queries$/, () => queriesView()],
  [/^#\/interventions$/, () => interventionsView()],
  [/^#\/intervention\/(.+)$/, (m) => interventionView(decodeURIComponent(m[1]))],
  [/^#\/cypher$/, () => cypherView()],
];

function route() {
  const hash = location.hash.split("?")[0] || "#/prompts";
  const tab = (hash.match(/^#\/([a-z]+)/) || [])[1] || "prompts";
  const tabName = { prompt: "prompts", feature: "features", supernode: "supernodes", intervention: "interventions" }[tab] || tab;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === tabName);
  for (const [re, fn] of routes) {
    const m = hash.match(re);
    if (m) {
      fill(view(), el("p", { class: "muted", text: "Loading…" }));
      Promise.resolve(fn(m)).catch((e) => fill(view(), errorBox(e)));
      return;
    }
  }
  location.hash = "#/prompts";
}

function hashParams() {
  return new URLSearchParams(location.hash.split("?")[1] || "");
}

let SUMMARY = null;
async function summary() {
  if (!SUMMARY) {
    SUMMARY = await api("/summary");
    document.getElementById("summary").textContent = `${SUMMARY.n_prompts} prompts · read-only`;
  }
  return SUMMARY;
}

// ------------------------------------------------------------------ prompts
async function promptsView() {
  const s = await summary();
  const hp = hashParams();
  const state = { q: hp.get("q") || "", model: hp.get("model") || "", job: hp.get("job") || "", answer: hp.get("answer") || "", offset: 0, limit: 50 };
  const results = el("div", { id: "prompt-results" });
  const form = el("form", { class: "filters", id: "prompt-filters" },
    el("label", {}, "text contains", el("input", { name: "q", value: state.q, placeholder: "a hand has", size: 30 })),
    el("label", {}, "model", el("select", { name: "model" }, el("option", { value: "", text: "any" }),
      s.models.map((m) => el("option", { value: m.model, text: `${m.model} (${m.n_prompts})`, selected: m.model === state.model })))),
    el("label", {}, "job", el("select", { name: "job" }, el("option", { value: "", text: "any" }),
      s.jobs.map((j) => el("option", { value: j.id, text: `${j.id} (${j.done}/${j.n_items})`, selected: j.id === state.job })))),
    el("label", {}, "answer (top logit)", el("input", { name: "answer", value: state.answer, placeholder: "5", size: 8 })),
    el("button", { class: "primary", type: "submit", text: "Search" }));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    for (const k of ["q", "model", "job", "answer"]) state[k] = form.elements[k].value;
    state.offset = 0;
    load();
  });
  async function load() {
    fill(results, el("p", { class: "muted", text: "Loading…" }));
    try {
      const r = await api("/prompts", { q: state.q, model: state.model, job: state.job, answer: state.answer, limit: state.limit, offset: state.offset });
      const pager = el("div", { class: "pager" },
        el("button", { type: "button", text: "← newer", disabled: state.offset === 0, onclick: () => { state.offset = Math.max(0, state.offset - state.limit); load(); } }),
        el("span", { class: "muted", text: `${state.offset + 1}–${state.offset + r.prompts.length}` }),
        el("button", { type: "button", text: "older →", disabled: !r.more, onclick: () => { state.offset += state.limit; load(); } }));
      fill(results, 
        table(r.prompts, [
          { key: "id", title: "prompt", render: (p) => promptLink(p.id) },
          { key: "text", max: 120 },
          "model",
          { key: "answer", title: "answer (p)", render: (p) => p.answer === null ? "" : `${JSON.stringify(p.answer)} ${fmt(p.answer_prob)}` },
          "n_nodes", "n_edges",
          ["replacement_score", "replacement"], ["completeness_score", "completeness"],
          { key: "has_image", title: "image", render: (p) => (p.has_image ? "yes" : "") },
        ], { id: "prompt-table", rowClass: "prompt-row", onClick: (p) => (location.hash = `#/prompt/${p.id}`), empty: "no prompts match" }),
        pager);
    } catch (e) { fill(results, errorBox(e)); }
  }
  fill(view(), el("h2", { text: "Prompts" }), form, results);
  await load();
}

// ------------------------------------------------------------------ one prompt: the circuit
function sanitiseSvg(text) {
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  const svg = doc.documentElement;
  if (!svg || svg.nodeName !== "svg") throw new Error("the server sent no SVG");
  for (const bad of svg.querySelectorAll("script, foreignObject")) bad.remove();
  for (const node of svg.querySelectorAll("*")) {
    for (const a of [...node.attributes]) {
      if (/^on/i.test(a.name) || (/href$/i.test(a.name) && !/^#|^data:image\//.test(a.value))) node.removeAttribute(a.name);
    }
  }
  return document.importNode(svg, true);
}

// Pan (drag) and zoom (wheel, buttons) by rewriting the SVG's viewBox.
function panZoom(container, svg) {
  const vb0 = svg.viewBox.baseVal;
  const home = { x: vb0.x, y: vb0.y, w: vb0.width, h: vb0.height };
  let vb = { ...home };
  const apply = () => svg.setAttribute("viewBox", `${vb.x} ${vb.y} ${vb.w} ${vb.h}`);
  const toSvg = (cx, cy) => {
    const r = svg.getBoundingClientRect();
    const scale = Math.max(vb.w / r.width, vb.h / r.height);
    const ox = vb.x + vb.w / 2 - (r.width * scale) / 2;
    const oy = vb.y + vb.h / 2 - (r.height * scale) / 2;
    return { x: ox + (cx - r.left) * scale, y: oy + (cy - r.top) * scale, scale };
  };
  const zoom = (factor, cx, cy) => {
    const r = svg.getBoundingClientRect();
    const p = toSvg(cx ?? r.left + r.width / 2, cy ?? r.top + r.height / 2);
    const w = Math.min(home.w * 4, Math.max(home.w / 40, vb.w / factor));
    const f = w / vb.w;
    vb = { x: p.x - (p.x - vb.x) * f, y: p.y - (p.y - vb.y) * f, w, h: vb.h * f };
    apply();
  };
  svg.addEventListener("wheel", (e) => { e.preventDefault(); zoom(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX, e.clientY); }, { passive: false });
  let drag = null;
  svg.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY, vb: { ...vb }, moved: false };
  });
  window.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; container.classList.add("dragging"); }
    const s = toSvg(0, 0).scale;
    vb = { ...drag.vb, x: drag.vb.x - dx * s, y: drag.vb.y - dy * s };
    apply();
  });
  window.addEventListener("pointerup", () => {
    if (drag && drag.moved) svg.dataset.justDragged = "1";
    drag = null;
    container.classList.remove("dragging");
  });
  return { zoomIn: () => zoom(1.4), zoomOut: () => zoom(1 / 1.4), reset: () => { vb = { ...home }; apply(); } };
}

async function promptView(pid) {
  const p = await api(`/prompts/${pid}`);
  const hp = hashParams();
  const state = { max_nodes: hp.get("max_nodes") || 60, max_edges: hp.get("max_edges") || 300 };
  const head = el("div", { class: "prompt-head" },
    el("div", { class: "text", id: "prompt-text", text: p.text }),
    el("div", { class: "chips" },
      el("span", { text: `id ${p.id.slice(0, 16)}` }), el("span", { text: `model ${p.model}` }),
      el("span", { text: `${p.n_nodes} nodes, ${p.n_edges} edges` }),
      el("span", { text: `replacement ${fmt(p.replacement_score)}` }), el("span", { text: `completeness ${fmt(p.completeness_score)}` }),
      p.image ? el("span", { text: `image ${p.image.slice(0, 12)} ${fmt(p.image_tags || [])}` }) : null),
    el("div", { class: "chips" }, "answers: ", p.logits.slice(0, 8).map((l) => el("span", { text: `${JSON.stringify(l.text ?? "#" + l.token_id)} ${fmt(l.prob)}` }))),
    p.supernodes.length ? el("div", { class: "chips" }, "supernodes here: ", p.supernodes.map((s) => el("span", {}, link(`${s.name} (${s.n_nodes} nodes)`, `#/supernode/${encodeURIComponent(s.name)}`)))) : null);

  const viewer = el("div", { class: "viewer", id: "circuit" });
  const panel = el("div", { class: "panel", id: "node-panel" }, el("p", { class: "muted", text: "Click a node of the circuit for its values, its strongest edges and, for a feature, its card." }));
  const controls = el("form", { class: "filters", id: "circuit-controls" },
    el("label", {}, "feature/error nodes", el("input", { name: "max_nodes", type: "number", min: 1, max: 400, value: state.max_nodes })),
    el("label", {}, "edges", el("input", { name: "max_edges", type: "number", min: 1, max: 4000, value: state.max_edges })),
    el("button", { type: "submit", text: "Redraw" }),
    el("a", { class: "link", href: `/api/prompts/${p.id}/circuit.svg`, target: "_blank", text: "open SVG" }));
  controls.addEventListener("submit", (e) => {
    e.preventDefault();
    state.max_nodes = controls.elements.max_nodes.value;
    state.max_edges = controls.elements.max_edges.value;
    drawCircuit();
  });

  async function drawCircuit() {
    fill(viewer, el("p", { class: "muted", text: "Drawing…" }));
    try {
      const res = await fetch(`/api/prompts/${p.id}/circuit.svg${qs({ max_nodes: state.max_nodes, max_edges: state.max_edges })}`);
      if (!res.ok) throw new Error((await res.json()).error);
      const svg = sanitiseSvg(await res.text());
      svg.removeAttribute("width");
      svg.removeAttribute("height");
      svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
      const pz = panZoom(viewer, svg);
      fill(viewer, svg,
        el("div", { class: "controls" },
          el("button", { type: "button", title: "zoom in", text: "+", onclick: pz.zoomIn }),
          el("button", { type: "button", title: "zoom out", text: "−", onclick: pz.zoomOut }),
          el("button", { type: "button", title: "whole circuit", text: "fit", onclick: pz.reset })),
        el("div", { class: "hint", text: "drag to pan · wheel to zoom · click a node" }));
      svg.addEventListener("click", (e) => {
        if (svg.dataset.justDragged) { delete svg.dataset.justDragged; return; }
        const g = e.target.closest('g[id^="node-"]');
        if (g) selectNode(g.id.slice(5));
      });
    } catch (e) { fill(viewer, errorBox(e)); }
  }

  // Mark the chosen node with a ring (the drawn markers keep their own styles) and show it.
  function selectNode(nid) {
    const svg = viewer.querySelector("svg");
    if (svg) {
      for (const old of svg.querySelectorAll(".selection-ring")) old.remove();
      for (const old of svg.querySelectorAll("g.selected")) old.classList.remove("selected");
      const g = svg.querySelector(`g[id="node-${CSS.escape(nid)}"]`);
      if (g) {
        g.classList.add("selected");
        const b = g.getBBox();
        const ring = document.createElementNS(svg.namespaceURI, "circle");
        ring.setAttribute("class", "selection-ring");
        ring.setAttribute("cx", b.x + b.width / 2);
        ring.setAttribute("cy", b.y + b.height / 2);
        ring.setAttribute("r", Math.max(b.width, b.height) / 2 + 4);
        svg.append(ring);
      }
    }
    showNode(nid);
  }

  async function showNode(nid) {
    fill(panel, el("p", { class: "muted", text: "Loading…" }));
    try {
      const n = await api(`/prompts/${p.id}/nodes/${encodeURIComponent(nid)}`);
      const rows = [
        ["node", n.id], ["kind", n.kind], ["layer", n.layer], ["position", n.pos],
        n.kind === "feature" ? ["feature", `${n.layer}/${n.feature}`] : null,
        n.token_text !== null ? ["token", JSON.stringify(n.token_text)] : null,
        n.activation !== null ? ["activation", fmt(n.activation)] : null,
        n.influence !== null ? ["influence", fmt(n.influence)] : null,
        n.kind === "logit" ? ["probability", fmt(n.logit_prob)] : null,
        n.image_row !== null ? ["image cell", `${n.image_row},${n.image_col} (k=${n.image_k})`] : null,
      ].filter(Boolean);
      const edgeCols = [{ key: "id", title: "node" }, "kind", { key: "label", max: 40 }, { key: "w", title: "weight" }];
      const edgeOpts = { empty: "none", onClick: (x) => selectNode(x.id) };
      fill(panel,
        el("h3", { id: "node-title", text: n.label || `${n.kind} ${n.id}` }),
        el("table", { class: "kv" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: fmt(v) }))))),
        n.card ? cardBlock(n.card, n.layer, n.feature, false) : null,
        el("h3", { text: "strongest inputs" }), table(n.inputs, edgeCols, edgeOpts),
        el("h3", { text: "strongest outputs" }), table(n.outputs, edgeCols, edgeOpts),
        el("p", { class: "muted", text: "weights are direct effects A[target, source]; click a row to go to that node" }));
    } catch (e) { fill(panel, errorBox(e)); }
  }

  const extras = el("div", {});
  const supernodeButton = el("button", { type: "button", text: "Show the supernode graph", onclick: () => {
    fill(extras, el("h3", { text: "supernode graph" }), el("img", { class: "picture", id: "supernode-picture", alt: "supernode graph", src: `/api/prompts/${p.id}/supernodes.svg` }));
  } });
  const heat = p.image ? heatmapForm(p) : null;
  fill(view(), el("h2", { text: "Circuit" }), head, controls,
    el("div", { class: "circuit-layout" }, viewer, panel),
    el("div", { class: "pager" }, supernodeButton), heat, extras);
  await drawCircuit();
}

function heatmapForm(p) {
  const out = el("div", {});
  const form = el("form", { class: "filters", id: "heatmap-form" },
    el("label", {}, "image tokens k (e.g. 0,3)", el("input", { name: "tokens", value: "0" })),
    el("button", { type: "submit", text: "Heatmap" }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const src = `/api/prompts/${p.id}/heatmap.png${qs({ tokens: form.elements.tokens.value })}`;
    const res = await fetch(src);
    if (!res.ok) { fill(out, errorBox(new Error((await res.json()).error))); return; }
    fill(out, el("img", { class: "picture", id: "heatmap-picture", alt: "rollout heatmap", src: URL.createObjectURL(await res.blob()) }));
  });
  return el("div", {}, el("h3", { text: "attention-rollout heatmap" }), form, out);
}

function cardBlock(card, layer, index, withLabel = true) {
  const lens = (card.top_tokens || []).map((t, i) => `${JSON.stringify(t)} ${card.top_values && card.top_values[i] !== undefined ? fmt(card.top_values[i]) : ""}`);
  return el("div", { class: "card" },
    withLabel ? el("div", { class: "card-label", text: card.label || "(no label)" }) : null,
    el("div", { class: "muted" }, card.name, " · ", link("feature page", `#/feature/${layer}/${index}`)),
    el("h3", { text: "logit lens" }), el("div", { class: "chips" }, lens.length ? lens.map((t) => el("span", { text: t })) : el("span", { text: "(none)" })),
    el("h3", { text: "top activations" }),
    card.snippets.length ? el("div", {}, card.snippets.map((s) => el("div", { class: "snippet" }, `${fmt(s.activation)}  `, s.text, " ", promptLink(s.prompt, "↗")))) : el("p", { class: "muted", text: "(none)" }),
    card.image_tops && card.image_tops.length ? el("div", { class: "muted", text: `${card.image_tops.length} top activations on image tokens (see the card picture)` }) : null);
}

// ------------------------------------------------------------------ features
async function featuresView() {
  const hp = hashParams();
  const state = { q: hp.get("q") || "", layer: hp.get("layer") || "", offset: 0, limit: 50 };
  const results = el("div", {});
  const form = el("form", { class: "filters", id: "feature-filters" },
    el("label", {}, "label contains", el("input", { name: "q", value: state.q, placeholder: "finger", size: 30 })),
    el("label", {}, "layer", el("input", { name: "layer", type: "number", min: 0, value: state.layer })),
    el("button", { class: "primary", type: "submit", text: "Search" }));
  form.addEventListener("submit", (e) => { e.preventDefault(); state.q = form.elements.q.value; state.layer = form.elements.layer.value; state.offset = 0; load(); });
  async function load() {
    try {
      const r = await api("/features", { q: state.q, layer: state.layer, limit: state.limit, offset: state.offset });
      fill(results, 
        table(r.features, [{ key: "fid", title: "feature", render: featureLink }, { key: "label", max: 100 }, "n_prompts", "max_act", { key: "fid", title: "id", max: 40 }],
          { id: "feature-table", onClick: (f) => (location.hash = `#/feature/${f.layer}/${f.index}`), empty: "no features match" }),
        el("div", { class: "pager" },
          el("button", { type: "button", text: "← previous", disabled: state.offset === 0, onclick: () => { state.offset = Math.max(0, state.offset - state.limit); load(); } }),
          el("button", { type: "button", text: "next →", disabled: !r.more, onclick: () => { state.offset += state.limit; load(); } })));
    } catch (e) { fill(results, errorBox(e)); }
  }
  fill(view(), el("h2", { text: "Features" }), form, results);
  await load();
}

async function featureView(layer, index) {
  const f = await api(`/features/${layer}/${index}`);
  fill(view(),
    el("h2", { text: `Feature ${layer}/${index}` }),
    el("div", { class: "two" },
      el("div", { class: "panel" }, cardBlock(f.card, layer, index)),
      el("div", {}, el("img", { class: "picture", alt: "feature card", src: `/api/features/${layer}/${index}/card.svg` }))),
    el("h3", { text: "active in prompts" }),
    table(f.active, [{ key: "prompt", render: (r) => promptLink(r.prompt) }, { key: "text", max: 100 }, "max_activation", "best_influence", "n_instances", "positions"],
      { id: "feature-active", onClick: (r) => (location.hash = `#/prompt/${r.prompt}`) }),
    el("h3", { text: "aggregated neighbours (across prompts)" }),
    table(f.neighbours, ["direction", { key: "neighbour", render: fidLink }, "label", "n_prompts", "sum_w", "mean_w", "max_w", "min_w"]));
}

// ------------------------------------------------------------------ supernodes
async function supernodesView() {
  const r = await api("/supernodes");
  fill(view(), el("h2", { text: "Supernodes" }),
    table(r.supernodes, ["name", "kind", "pattern", "n_members"], { id: "supernode-table", onClick: (s) => (location.hash = `#/supernode/${encodeURIComponent(s.name)}`), empty: "no supernodes defined (atlas supernode define …)" }));
}

async function supernodeView(name) {
  const s = await api(`/supernodes/${encodeURIComponent(name)}`);
  fill(view(),
    el("h2", { text: `Supernode ${s.name}` }),
    el("p", { class: "muted", text: `${s.kind || ""} ${s.pattern ? "pattern " + s.pattern : ""} · ${s.n_members} member features` }),
    el("div", { class: "two" },
      el("div", {}, el("h3", { text: "members" }),
        table(s.members, [{ key: "fid", title: "feature", render: fidLink }, "label", "n_prompts"])),
      el("div", {}, el("h3", { text: "neighbouring supernodes across prompts" }),
        s.neighbours.length ? el("img", { class: "picture", alt: "supernode neighbours", src: `/api/supernodes/${encodeURIComponent(s.name)}/neighbours.svg` }) : null,
        table(s.neighbours, ["direction", "neighbour", "n_prompts", "sum_w", "mean_w"], { empty: "no edges to other supernodes yet" }))),
    el("h3", { text: "active in prompts" }),
    table(s.active, [{ key: "prompt", render: (r) => promptLink(r.prompt) }, { key: "text", max: 100 }, "max_activation", "n_instances", "positions"]),
    el("h3", { text: "interventions on it" }),
    table(s.interventions, [{ key: "id", render: (r) => link(r.id.slice(0, 12), `#/intervention/${encodeURIComponent(r.id)}`) }, { key: "prompt", max: 80 }, "multiplier", "kl"], { empty: "none stored" }));
}

// ------------------------------------------------------------------ named queries
const ENDPOINT_HELP = "supernode:NAME · feature:L/I · token:TEXT · logit:TEXT (paths sources also: image, image:ROW,COL)";

const QUERIES = [
  { name: "paths", title: "Paths between two endpoints, within each prompt, summed across prompts", help: ENDPOINT_HELP,
    fields: [["from", "token:Hand"], ["to", "logit:5"], ["max_hops", 4, "number"], ["min_weight", 0, "number"], ["image_tag", ""], ["limit", 20, "number"]],
    picture: (v) => `/api/query/paths.svg${qs(v)}`,
    caption: "The picture draws the strongest routes (limit) as one layered graph: an edge's colour is the sign of the summed score of the routes through it (blue > 0, red < 0), its width that sum's size; it is not the sign of the single edge, which the paths table gives (weights).",
    render: (r) => [
      el("h3", { text: "routes summed across prompts" }),
      table(r.aggregate, [{ key: "route", max: 300 }, "n_prompts", "n_paths", "sum_score"], { id: "paths-aggregate", empty: "no paths" }),
      el("h3", { text: "paths (strongest first)" }),
      table(r.paths, [{ key: "prompt", render: (p) => promptLink(p.prompt) }, { key: "nodes", max: 300, render: (p) => p.nodes.join(" → ") }, "weights", "score"], { id: "paths-table", empty: "no paths" }),
      r.truncated ? el("p", { class: "muted", text: "more paths than the row cap: results are partial" }) : null] },
  { name: "active", title: "Prompts where a feature or supernode is active", help: "feature:L/I · supernode:NAME",
    fields: [["spec", "supernode:Hand"], ["image_tag", ""], ["limit", 50, "number"]],
    render: (r) => table(r.rows, [{ key: "prompt", render: (x) => promptLink(x.prompt) }, { key: "text", max: 100 }, "max_activation", "best_influence", "n_instances", "positions"]) },
  { name: "contributors", title: "Top direct contributors to a logit across prompts", help: "logit:TEXT",
    fields: [["logit", "logit:5"], ["limit", 20, "number"]],
    render: (r) => table(r.rows, ["name", "kind", "layer", "n_prompts", "sum_w", "sum_abs", "max_w"]) },
  { name: "neighbours", title: "Aggregated neighbours of a feature or supernode", help: "feature:L/I · supernode:NAME",
    fields: [["spec", "supernode:Hand"], ["limit", 20, "number"]],
    render: (r) => table(r.rows, ["direction", "neighbour", "label", "n_prompts", "sum_w", "mean_w", "max_w", "min_w"]) },
  { name: "compare", title: "Two prompts side by side", help: "prompt ids (or unique prefixes)",
    fields: [["a", ""], ["b", ""], ["limit", 20, "number"]],
    render: (r) => [el("h3", { text: "features in both" }), table(r.shared_features, ["feature", "act_a", "act_b"]),
      el("div", { class: "two" }, el("div", {}, el("h3", { text: "only in a" }), table(r.only_a, ["feature", "act_a"])),
        el("div", {}, el("h3", { text: "only in b" }), table(r.only_b, ["feature", "act_b"]))),
      el("h3", { text: "shared feature edges" }), table(r.shared_edges, ["source", "target", "w_a", "w_b"])] },
  { name: "supernode-graph", title: "One prompt collapsed to its supernodes", help: "prompt id (or a unique prefix)",
    fields: [["prompt", ""], ["limit", 100, "number"]],
    picture: (v) => `/api/prompts/${encodeURIComponent(v.prompt)}/supernodes.svg`,
    render: (r) => table(r.rows, ["source", "target", "weight", "n_edges"]) },
  { name: "image-regions", title: "Image regions that feed a feature", help: "feature:L/I · supernode:NAME",
    fields: [["spec", ""], ["image_tag", ""], ["limit", 20, "number"]],
    render: (r) => table(r.rows, [{ key: "image", max: 12 }, "row", "col", "n_prompts", "n_edges", "sum_w", "max_w", "top_patches"]) },
];

function queryBlock(q) {
  const result = el("div", { id: `result-${q.name}` });
  const form = el("form", { class: "query", id: `form-${q.name}` },
    q.fields.map(([name, value, type]) => el("label", {}, name.replace("_", " "),
      el("input", { name, value, type: type || "text", step: type === "number" ? "any" : null, size: type ? null : 22 }))),
    el("button", { class: "primary", type: "submit", text: "Run" }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const values = {};
    for (const [name] of q.fields) values[name] = form.elements[name].value;
    fill(result, el("p", { class: "muted", text: "Running…" }));
    try {
      const r = await api(`/query/${q.name}`, values);
      const picture = q.picture ? el("img", { class: "picture", id: `picture-${q.name}`, alt: `${q.name} picture`, src: q.picture(values) }) : null;
      const caption = q.caption ? el("p", { class: "muted caption", text: q.caption }) : null;
      fill(result, picture, caption, q.render(r));
    } catch (err) { fill(result, errorBox(err)); }
  });
  return el("section", { class: "query-block" }, el("h3", { text: q.title }), el("div", { class: "help", text: q.help }), form, result);
}

async function queriesView() {
  fill(view(), el("h2", { text: "Named queries" }), ...QUERIES.map(queryBlock));
}

// ------------------------------------------------------------------ interventions
async function interventionsView() {
  const r = await api("/interventions", { limit: 200 });
  fill(view(), el("h2", { text: "Interventions" }),
    table(r.interventions, [{ key: "id", render: (x) => link(x.id.slice(0, 12), `#/intervention/${encodeURIComponent(x.id)}`) },
      { key: "prompt_id", render: (x) => (x.prompt_id ? promptLink(x.prompt_id) : "") }, { key: "prompt", max: 80 }, "supernode", "multiplier", "n_edits", ["kl", "KL (effect)"]],
    { id: "intervention-table", onClick: (x) => (location.hash = `#/intervention/${encodeURIComponent(x.id)}`), empty: "no interventions stored (atlas intervene …)" }));
}

function topTable(top) {
  if (!top) return el("p", { class: "muted", text: "(none)" });
  if (Array.isArray(top)) return table(top.map((t) => (typeof t === "object" ? t : { value: t })));
  if (typeof top === "object") {
    const parts = [];
    for (const [k, v] of Object.entries(top)) {
      parts.push(el("h3", { text: k }));
      parts.push(Array.isArray(v) && v.length && typeof v[0] === "object" ? table(v) : el("pre", { text: JSON.stringify(v, null, 1) }));
    }
    return el("div", {}, parts);
  }
  return el("pre", { text: String(top) });
}

async function interventionView(iid) {
  const i = await api(`/interventions/${encodeURIComponent(iid)}`);
  const pred = i.predicted || null;
  fill(view(),
    el("h2", { text: `Intervention ${i.id.slice(0, 16)}` }),
    el("div", { class: "prompt-head" },
      el("div", { class: "text", text: i.prompt || "" }),
      el("div", { class: "chips" }, i.prompt_id ? el("span", {}, promptLink(i.prompt_id, "stored prompt")) : null,
        el("span", { text: `KL ${fmt(i.kl)}` }), i.supernode ? el("span", { text: `supernode ${i.supernode} × ${fmt(i.multiplier)}` }) : null,
        el("span", { text: `${i.n_edits ?? 0} edits` }))),
    el("h3", { text: "effect on the next token (probabilities)" }),
    Array.isArray(i.top)
      ? table(i.top.map((t) => ({ ...t, change: typeof t.steered === "number" && typeof t.base === "number" ? t.steered - t.base : null })), ["token", "token_id", "base", "steered", "change"], { id: "intervention-top" })
      : topTable(i.top),
    pred ? el("h3", { text: "predicted by the graph (direct effect) vs measured, per target logit row" }) : null,
    pred && Array.isArray(pred.rows)
      ? table(pred.rows.map((row, k) => ({ row, predicted: pred.direct_effect?.[k], measured: pred.measured?.[k] })), ["row", "predicted", "measured"], { id: "intervention-predicted" })
      : pred ? topTable(pred) : null,
    pred && pred.sources ? el("p", { class: "muted", text: `changed features in the graph (layer, position, feature): ${pred.sources.map((x) => x.join(":")).join(", ")}` }) : null,
    el("h3", { text: "spec" }), el("pre", { id: "intervention-spec", text: JSON.stringify(i.spec, null, 1) }));
}

// ------------------------------------------------------------------ raw cypher
async function cypherView() {
  const result = el("div", { id: "cypher-result" });
  const form = el("form", { id: "cypher-form" },
    el("textarea", { name: "q", text: "MATCH (f:Feature) RETURN f.layer AS layer, count(*) AS n ORDER BY layer" }),
    el("div", { class: "pager" }, el("button", { class: "primary", type: "submit", text: "Run (read-only)" }),
      el("span", { class: "muted", text: "the guard of atlas cypher: reads only, server timeout, row and byte caps" })));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await api("/cypher", { q: form.elements.q.value });
      fill(result, table(r.rows, r.keys.map((k) => ({ key: k, max: 200 }))), r.truncated ? el("p", { class: "muted", text: "truncated at the row cap" }) : null);
    } catch (err) { fill(result, errorBox(err)); }
  });
  fill(view(), el("h2", { text: "Cypher" }), form, result);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => { summary().catch(() => {}); route(); });
