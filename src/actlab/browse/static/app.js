// actlab feature browser: the one script of index.html and unit.html. Data files are scripts that call
// actlabBrowse.index / .search / .vocab / .unit, so the pages work from disk (file://) and when served.
"use strict";
(function () {
  const B = (window.actlabBrowse = window.actlabBrowse || {});
  const store = { units: {} };
  B.index = (d) => { store.index = d; };
  B.search = (d) => { store.search = d; };
  B.vocab = (d) => { store.vocab = d; };
  B.unit = (d) => { store.units[d.id] = d; };
  B.store = store;

  const loading = {};
  function load(src) {
    if (!loading[src]) {
      loading[src] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = src;
        s.onload = () => resolve();
        s.onerror = () => { delete loading[src]; reject(new Error("could not load " + src)); };
        document.head.appendChild(s);
      });
    }
    return loading[src];
  }
  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children) e.append(c);
    return e;
  }
  const fmt = (x) => (Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 0.001) ? x.toExponential(2) : x.toPrecision(3));
  const pct = (x) => (x === 0 ? "0%" : x * 100 >= 0.01 ? (x * 100).toPrecision(3) + "%" : (x * 100).toExponential(1) + "%");
  const shown = (s) => s.replace(/\n/g, "⏎").replace(/\t/g, "→");
  const tok = (id) => shown(store.vocab[id] ?? "?");
  function fail(err) {
    const p = el("p", { class: "error" }, String(err.message || err));
    document.body.prepend(p);
  }

  // ------------------------------------------------------------------ index page
  function indexPage() {
    Promise.all([load("data/index.js"), load("data/vocab.js")]).then(() => {
      const m = store.index.meta;
      $("meta").textContent = `${m.n_units} ${m.kind} of ${m.site} in ${m.model}, over ${m.n_tokens.toLocaleString()} tokens`;
      for (const id of ["q", "dmin", "dmax", "amin", "sort"]) $(id).addEventListener("input", renderIndex);
      renderIndex();
    }).catch(fail);
  }

  function num(id, scale) {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v * scale : null;
  }

  function renderIndex() {
    const q = $("q").value.trim().toLowerCase();
    if (q && !store.search) {
      $("count").textContent = "loading the text of the top contexts…";
      load("data/search.js").then(renderIndex).catch(fail);
      return;
    }
    const dmin = num("dmin", 0.01), dmax = num("dmax", 0.01), amin = num("amin", 1);
    const units = store.index.units;
    let rows = units.map((u, i) => [u, i]).filter(([u, i]) =>
      (dmin === null || u[1] >= dmin) && (dmax === null || u[1] <= dmax) && (amin === null || u[2] >= amin) &&
      (!q || store.search[i].toLowerCase().includes(q)));
    const sort = $("sort").value, desc = sort.startsWith("-"), key = { id: 0, density: 1, max: 2 }[sort.replace("-", "")];
    rows.sort((a, b) => (desc ? b[0][key] - a[0][key] : a[0][key] - b[0][key]) || a[0][0] - b[0][0]);
    const limit = 500, body = $("units").tBodies[0];
    body.replaceChildren(...rows.slice(0, limit).map(([u]) => indexRow(u)));
    $("count").textContent = `${rows.length} of ${units.length} units`;
    $("more").textContent = rows.length > limit ? `showing the first ${limit}; filter to see others` : "";
  }

  function indexRow(u) {
    const [id, density, max, mean, seen, logits] = u;
    const tokens = (ids) => el("td", {}, ...ids.map((t) => el("span", { class: "tk" }, tok(t))));
    return el("tr", { "data-unit": id },
      el("td", {}, el("a", { href: `unit.html#${id}` }, String(id))),
      el("td", { class: "num" }, pct(density)), el("td", { class: "num" }, fmt(max)),
      el("td", { class: "num" }, fmt(mean)), tokens(seen), tokens(logits));
  }

  // ------------------------------------------------------------------ unit page
  function unitPage() {
    load("data/vocab.js").then(() => {
      window.addEventListener("hashchange", showUnit);
      showUnit();
    }).catch(fail);
  }

  function showUnit() {
    const id = parseInt(location.hash.slice(1), 10);
    if (!Number.isInteger(id)) { fail(new Error("no unit in the address: open unit.html#ID")); return; }
    load(`units/u${id}.js`).then(() => renderUnit(store.units[id])).catch(fail);
  }

  function renderUnit(u) {
    document.title = `unit ${u.id} · actlab feature browser`;
    $("title").textContent = `unit ${u.id}`;
    $("stats").textContent = `fires on ${pct(u.density)} of ${u.n_tokens.toLocaleString()} tokens (${u.n_fire.toLocaleString()}) · ` +
      `max ${fmt(u.max)} · mean when firing ${fmt(u.mean)}`;
    for (const [link, target] of [["prev", u.prev], ["next", u.next]]) {
      $(link).hidden = target === null;
      if (target !== null) $(link).href = `#${target}`;
    }
    histogram(u);
    $("logits").replaceChildren(logitTables(u.logits));
    $("top").replaceChildren(...(u.top.length ? u.top.map((c) => context(c, u.max)) : [el("p", { class: "muted" }, "never fired")]));
    $("intervals").replaceChildren(...u.intervals.map((iv) => el("div", { class: "interval" },
      el("h3", {}, `${fmt(iv.lo)} – ${fmt(iv.hi)}: ${iv.count.toLocaleString()} firings, ${iv.samples.length} shown`),
      ...iv.samples.map((c) => context(c, u.max)))));
  }

  function context(c, scale) {
    const [value, doc, pos, center, toks, acts] = c;
    const div = el("div", { class: "ctx", "data-doc": doc, "data-pos": pos }, el("span", { class: "v" }, fmt(value)));
    toks.forEach((t, j) => {
      const a = acts[j];
      const s = el("span", { class: j === center ? "t center" : "t", title: fmt(a), "data-act": a }, tok(t));
      const alpha = scale > 0 ? Math.max(0, Math.min(1, a / scale)) : 0;
      if (alpha > 0) s.style.background = `rgba(224, 123, 57, ${alpha.toFixed(3)})`;
      div.append(s);
    });
    return div;
  }

  function histogram(u) {
    const counts = u.hist.counts, w = u.hist.width;
    let used = counts.length;
    while (used > 1 && counts[used - 1] === 0) used--;
    const W = 480, H = 140, peak = Math.log1p(Math.max(1, ...counts)), bw = W / used;
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H + 14}`);
    svg.setAttribute("width", W);
    counts.slice(0, used).forEach((n, j) => {
      const h = (Math.log1p(n) / peak) * H, r = document.createElementNS(ns, "rect");
      for (const [k, v] of Object.entries({ class: "bar", x: j * bw, y: H - h, width: Math.max(bw - 1, 1), height: h })) r.setAttribute(k, v);
      const t = document.createElementNS(ns, "title");
      t.textContent = `${fmt(j * w)} – ${fmt((j + 1) * w)}: ${n}`;
      r.append(t);
      svg.append(r);
    });
    for (const [x, label, anchor] of [[0, "0", "start"], [W, fmt(used * w), "end"]]) {
      const t = document.createElementNS(ns, "text");
      for (const [k, v] of Object.entries({ x, y: H + 12, "text-anchor": anchor })) t.setAttribute(k, v);
      t.textContent = label;
      svg.append(t);
    }
    $("hist").replaceChildren(svg);
    $("histnote").textContent = `firing activations (bar height: log of the count); ${u.hist.below.toLocaleString()} tokens did not fire`;
  }

  function logitTables(logits) {
    if (!logits) return el("p", { class: "muted" }, "this site's units have no direct path to the logits");
    const table = (title, rows) => el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, title), el("th", {}, "logit"))),
      el("tbody", {}, ...rows.map(([t, v]) => el("tr", {}, el("td", {}, el("span", { class: "tk" }, tok(t))), el("td", { class: "num" }, fmt(v))))));
    return el("div", { class: "logit" }, table("promotes", logits.top), table("suppresses", logits.bottom));
  }

  const page = document.body.dataset.page;
  if (page === "index") indexPage();
  else if (page === "unit") unitPage();
})();
