// fashionhash web page: browse the catalogue, filter it, click an item to see its nearest
// neighbours in Hamming space, or drop a photo to search with. Plain DOM, no framework;
// every catalogue string goes through textContent (never innerHTML).
//
// History: an opened item has its own URL (?item=ID: shared, bookmarked, reached with the
// back button). A photo cannot go in a URL, so a photo search gets a history entry on the
// page's URL without ?item, whose state names the photo kept in memory: back and forward
// return to it during this visit; after a reload that entry shows the catalogue alone.
"use strict";

const PAGE = 48;
const LABELS = { gender: "Gender", masterCategory: "Category", articleType: "Type", baseColour: "Colour" };
const state = { offset: 0, total: 0, nBits: 64, query: null, selected: null, seq: 0 };
const TITLE = document.title;
const MAX_PHOTOS = 20; // photos kept for back/forward (File objects hold their bytes)
const photos = new Map(); // history key -> File
// keys are unique to this page load: after a reload, an old entry's key must not name a new photo
const LOAD_ID = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
let photoSeq = 0;

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en");

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

async function api(path, options) {
  const res = await fetch(path, options);
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

let toastTimer = null;
function toast(message) {
  const t = $("toast");
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 5000);
}

// ---------------------------------------------------------------- filters

function filterParams() {
  const params = new URLSearchParams();
  for (const sel of document.querySelectorAll("#facet-selects select")) {
    if (sel.value) params.append(sel.name, sel.value);
  }
  return params;
}

function k() { return $("k").value; }

async function loadFacets() {
  const facets = await api("/facets");
  const box = $("facet-selects");
  box.replaceChildren();
  for (const [key, values] of Object.entries(facets)) {
    const sel = el("select", { name: key, id: `f-${key}`, "data-testid": `filter-${key}` });
    sel.append(el("option", { value: "", text: `All` }));
    for (const { value, count } of values) {
      sel.append(el("option", { value, text: `${value} (${fmt.format(count)})` }));
    }
    sel.addEventListener("change", onFiltersChanged);
    const label = LABELS[key] || key.charAt(0).toUpperCase() + key.slice(1);  // a manifest's own columns
    box.append(el("label", { class: "field", for: `f-${key}` }, [el("span", { text: label }), sel]));
  }
}

function onFiltersChanged() {
  for (const sel of document.querySelectorAll("#facet-selects select")) sel.classList.toggle("active", !!sel.value);
  state.offset = 0;
  loadPage();
  rerunQuery();
}

// ---------------------------------------------------------------- cards

function subtitle(item) {
  // the server joins the attributes that describe an item in this catalogue
  return item.summary || "";
}

function card(item, onClick) {
  const img = el("img", { src: item.image_url, alt: item.name, loading: "lazy", decoding: "async" });
  const frame = el("div", { class: "img" }, [img]);
  img.addEventListener("error", () => { img.remove(); frame.classList.add("missing"); });
  const node = el("button", { type: "button", class: "card", title: item.name, dataset: { id: item.id } }, [
    frame,
    el("div", { class: "body" }, [el("p", { class: "title", text: item.name }), el("div", { class: "sub", text: subtitle(item) })]),
  ]);
  if (item.distance !== undefined) {
    // green for near, through amber to red for far (relative to the code length)
    const hue = Math.round(140 * Math.max(0, 1 - item.distance / Math.max(8, state.nBits / 4)));
    const badge = el("span", { class: "dist", title: `Hamming distance ${item.distance} of ${state.nBits} bits`, text: `d ${item.distance}` });
    badge.style.setProperty("--hue", hue);
    node.append(badge);
  }
  if (item.score !== undefined) {
    // two-stage search: the shortlist came by a binary code, this order by the descriptor
    node.append(el("span", { class: "score", title: "descriptor cosine (second stage: re-ranks the shortlist)", text: `cos ${item.score.toFixed(2)}` }));
  }
  node.addEventListener("click", () => onClick(item));
  return node;
}

function skeletons(n) {
  return Array.from({ length: n }, () => el("div", { class: "card skeleton" }, [
    el("div", { class: "img" }), el("div", { class: "body" }, [el("p", { class: "title", text: "." }), el("div", { class: "sub", text: "." })]),
  ]));
}

// ---------------------------------------------------------------- catalogue grid

async function loadPage() {
  const grid = $("grid");
  grid.setAttribute("aria-busy", "true");
  if (!grid.children.length) grid.replaceChildren(...skeletons(12));
  const params = filterParams();
  params.set("offset", state.offset);
  params.set("limit", PAGE);
  try {
    const page = await api(`/items?${params}`);
    state.total = page.total;
    grid.replaceChildren(...page.items.map((it) => card(it, showSimilar)));
    if (!page.items.length) grid.append(el("p", { class: "empty", text: "No items match these filters." }));
    markSelected();
    const last = Math.min(state.offset + PAGE, page.total);
    $("count").textContent = `${fmt.format(page.total)} items`;
    $("page").textContent = page.total ? `${fmt.format(state.offset + 1)}–${fmt.format(last)} of ${fmt.format(page.total)}` : "";
    $("prev").disabled = state.offset === 0;
    $("next").disabled = last >= page.total;
  } catch (e) {
    toast(`Could not load the catalogue: ${e.message}`);
  } finally {
    grid.setAttribute("aria-busy", "false");
  }
}

function markSelected() {
  for (const c of document.querySelectorAll("#grid .card")) {
    c.classList.toggle("selected", state.selected !== null && c.dataset.id === String(state.selected));
  }
}

// ---------------------------------------------------------------- neighbours panel

function openPanel() {
  $("panel").hidden = false;
  $("layout").classList.add("has-panel");
}

function hidePanel() {
  $("panel").hidden = true;
  $("layout").classList.remove("has-panel");
  state.query = null;
  state.selected = null;
  state.seq += 1; // a search still under way must not reopen the panel
  document.title = TITLE;
  markSelected();
}

function closePanel() {
  if ($("panel").hidden) return;
  hidePanel();
  pushView({});
}

function showResults(res, { kind, title, meta, image }) {
  openPanel();
  $("q-kind").textContent = kind;
  $("q-title").textContent = title;
  $("q-meta").textContent = meta;
  $("q-img").src = image;
  $("q-img").alt = title;
  const time = $("q-time");
  time.replaceChildren();
  const parts = [`${res.results.length} nearest in `, el("b", { text: `${res.took_ms.toFixed(1)} ms` })];
  if (res.encode_ms !== undefined) {
    parts.push(` (encode ${res.encode_ms.toFixed(1)} ms + index ${res.search_ms.toFixed(2)} ms)`);
  } else {
    parts.push(` (index ${res.search_ms.toFixed(2)} ms)`);
  }
  if (res.ranking) {
    // which stage ranked what: the shortlist by Hamming distance, its order by descriptor
    const first = res.ranking.sign_bits
      ? `the ${res.ranking.shortlist} nearest by a ${res.ranking.sign_bits}-bit sign code of the descriptor`
      : `the ${res.ranking.shortlist} nearest codes (Hamming distance d)`;
    parts.push(el("br"), el("span", { class: "ranking", dataset: { stage: res.ranking.stage }, text: res.ranking.stage === "two-stage"
      ? `Ranked in two stages: ${first}, re-ordered by descriptor similarity (cos); d is the hash code's Hamming distance.`
      : "Ranked by Hamming distance of the codes (d)." }));
  }
  time.append(...parts);
  time.dataset.testid = "search-time";
  const box = $("results");
  box.replaceChildren(...res.results.map((it) => card(it, showSimilar)));
  if (!res.results.length) box.append(el("p", { class: "empty", text: "Nothing matches these filters." }));
  box.setAttribute("aria-busy", "false");
  if (window.matchMedia("(max-width: 900px)").matches) $("panel").scrollIntoView({ behavior: "smooth", block: "start" });
}

// a click on a card: the item becomes the query, with its own history entry
function showSimilar(item) {
  openItem(item.id, { push: true });
}

// Only the latest search may fill the panel and the URL (an earlier one can answer later).
async function openItem(id, { push = false } = {}) {
  const seq = ++state.seq;
  state.query = { type: "item", id };
  state.selected = id;
  markSelected();
  const params = filterParams();
  params.set("k", k());
  $("results").setAttribute("aria-busy", "true");
  try {
    const res = await api(`/items/${encodeURIComponent(id)}/similar?${params}`);
    if (seq !== state.seq) return;
    const q = res.query;
    if (push && !isCurrentItem(q.id)) pushView({ item: q.id });
    document.title = `${q.name} · ${TITLE}`;
    showResults(res, { kind: `Item ${q.id}`, title: q.name, meta: subtitle(q), image: q.image_url });
  } catch (e) {
    if (seq !== state.seq) return;
    if (!push) hidePanel(); // reached by URL or history: show no other item's neighbours under it
    toast(`Search failed: ${e.message}`);
  }
}

async function searchPhoto(file, { push = true, key = null } = {}) {
  if (!file) return;
  if (!/^image\/(jpeg|png|webp|gif)$/.test(file.type)) {
    toast("Please choose a JPEG, PNG, WebP or GIF photo.");
    return;
  }
  const seq = ++state.seq;
  const form = new FormData();
  form.append("image", file);
  form.append("k", k());
  for (const [name, value] of filterParams()) form.append(name, value);
  $("drop").classList.add("over");
  try {
    const res = await api("/search", { method: "POST", body: form });
    if (seq !== state.seq) return;
    if (push) key = rememberPhoto(file);
    if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
    state.queryUrl = URL.createObjectURL(file);
    state.query = { type: "photo", file, key };
    state.selected = null;
    markSelected();
    if (push) pushView({ photo: key });
    document.title = `${file.name} · ${TITLE}`;
    showResults(res, { kind: "Your photo", title: file.name, meta: `${fmt.format(Math.round(file.size / 1024))} KB · code ${res.query.code}`, image: state.queryUrl });
  } catch (e) {
    if (seq === state.seq) toast(`Search failed: ${e.message}`);
  } finally {
    $("drop").classList.remove("over");
  }
}

// filters or k changed: the same query again, in the same history entry
function rerunQuery() {
  if (!state.query) return;
  if (state.query.type === "item") openItem(state.query.id);
  else searchPhoto(state.query.file, { push: false, key: state.query.key });
}

// ---------------------------------------------------------------- history

function rememberPhoto(file) {
  const key = `${LOAD_ID}-${++photoSeq}`;
  photos.set(key, file);
  for (const old of photos.keys()) {
    if (photos.size <= MAX_PHOTOS) break;
    photos.delete(old);
  }
  return key;
}

// the page's URL with ?item set to itemId (or removed), other parameters kept
function urlFor(itemId) {
  const url = new URL(window.location.href);
  if (itemId === undefined || itemId === null) url.searchParams.delete("item");
  else url.searchParams.set("item", String(itemId));
  return `${url.pathname}${url.search}${url.hash}`;
}

function pushView(view) {
  window.history.pushState(view, "", urlFor(view.item));
}

function itemInUrl() {
  return new URLSearchParams(window.location.search).get("item");
}

function isCurrentItem(id) {
  return itemInUrl() === String(id);
}

// show what the current URL and history entry say: an item, a remembered photo, or neither
function applyLocation(view) {
  const item = itemInUrl();
  if (item !== null) {
    if (/^\d+$/.test(item)) {
      openItem(Number(item));
    } else {
      hidePanel();
      toast(`No such item: "${item}" is not an item id.`);
    }
  } else if (view && view.photo && photos.has(view.photo)) {
    searchPhoto(photos.get(view.photo), { push: false, key: view.photo });
  } else {
    hidePanel();
  }
}

// ---------------------------------------------------------------- wiring

async function loadStats() {
  try {
    const s = await api("/stats");
    state.nBits = s.n_bits;
    $("q-bits").textContent = s.n_bits;
    const chips = [
      [fmt.format(s.items), " items"], [s.n_bits, "-bit codes"], [s.backend, " index"],
    ];
    if (s.run) chips.push([s.run.method, ` · ${s.run.backbone}`]);
    $("stats").replaceChildren(...chips.map(([b, t]) => el("span", { class: "chip" }, [el("b", { text: String(b) }), t])));
  } catch (e) {
    toast(`Could not reach the server: ${e.message}`);
  }
}

function wireDrop() {
  const drop = $("drop");
  const input = $("file");
  const overlay = $("dropzone-overlay");
  input.addEventListener("change", () => { searchPhoto(input.files[0]); input.value = ""; });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  window.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth += 1; overlay.hidden = false; } });
  window.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) overlay.hidden = true; });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    searchPhoto(e.dataTransfer.files[0]);
  });
}

function init() {
  wireDrop();
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadPage(); window.scrollTo({ top: 0 }); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadPage(); window.scrollTo({ top: 0 }); });
  $("close").addEventListener("click", closePanel);
  window.addEventListener("popstate", (e) => applyLocation(e.state));
  $("k").addEventListener("change", rerunQuery);
  $("clear").addEventListener("click", () => {
    for (const sel of document.querySelectorAll("#facet-selects select")) sel.value = "";
    onFiltersChanged();
  });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("panel").hidden) closePanel(); });
  loadStats();
  loadFacets().catch((e) => toast(`Could not load filters: ${e.message}`));
  loadPage();
  applyLocation(window.history.state);
}

document.addEventListener("DOMContentLoaded", init);
