"use strict";
// The mltag review page: tag a dropped photo or a listing id and show its similar listings; list
// the top anomalies and the near-duplicate groups. Everything the server returns is shown as
// text (textContent), never parsed as HTML. Paths are relative: the pages and the API share a prefix.
// body[data-state] is idle | busy | done | error, so a person (and a headless test) can tell.

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key === "alt" || key === "href" || key === "src") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function setState(state, message) {
  document.body.dataset.state = state;
  document.getElementById("status").textContent = message || "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: "bad_response", message: `HTTP ${response.status}` };
  }
  if (!response.ok) {
    const error = new Error(body.message || `HTTP ${response.status}`);
    error.code = body.error || `http_${response.status}`;
    throw error;
  }
  return body;
}

function figure(listingId, thumbnail, caption) {
  return el(
    "figure",
    { "data-listing-id": listingId },
    thumbnail ? el("img", { src: thumbnail, alt: listingId, loading: "eager" }) : el("div", { class: "no-thumb" }, "no thumbnail"),
    el("figcaption", {}, el("a", { href: `./?listing=${encodeURIComponent(listingId)}` }, listingId), caption ? el("div", {}, caption) : null),
  );
}

async function showServer() {
  try {
    const health = await api("healthz");
    const index = health.index ? `index ${health.index.version} (${health.index.count} listings)` : "no index";
    document.getElementById("server").textContent = `model ${health.model_version}, ${index}`;
    return health;
  } catch (e) {
    document.getElementById("server").textContent = "server unreachable";
    return null;
  }
}

// ---- look up: a photo or a listing id -> tags and similar listings ------------------------------
function renderTags(result) {
  const list = document.getElementById("tags");
  list.replaceChildren();
  for (const tag of result.tags) {
    const item = el("li", { "data-tag": tag.tag, "data-score": String(tag.score) }, el("span", { class: "tag" }, tag.tag), el("span", { class: "score" }, tag.score.toFixed(3)));
    for (const [name, specialist] of Object.entries(tag.specialists || {})) {
      const nested = el("ul", { "data-specialist": name, "data-model-version": specialist.model_version });
      for (const sub of specialist.tags) {
        nested.append(el("li", { "data-tag": sub.tag, "data-score": String(sub.score) }, el("span", { class: "specialist" }, `${name}: ${sub.tag}`), el("span", { class: "score" }, sub.score.toFixed(3))));
      }
      if (!specialist.tags.length) nested.append(el("li", { class: "specialist" }, `${name}: no tag`));
      item.append(nested);
    }
    list.append(item);
  }
  if (!result.tags.length) list.append(el("li", { class: "none" }, "no tag passed its threshold"));
  const versions = Object.entries(result.model_versions).map(([name, version]) => `${name} ${version}`).join(", ");
  document.getElementById("versions").textContent = `models: ${versions}; ${result.latency_ms} ms`;
}

function renderSimilar(result) {
  const grid = document.getElementById("similar");
  grid.replaceChildren();
  if (!result) {
    document.getElementById("index-info").textContent = "this server has no index";
    return;
  }
  document.getElementById("index-info").textContent = `index ${result.index.version}, top ${result.k}, ${result.latency_ms} ms`;
  for (const n of result.neighbours) grid.append(figure(n.listing_id, n.thumbnail, n.similarity.toFixed(4)));
}

async function look(request, queryNode, health) {
  setState("busy", "looking...");
  document.getElementById("query").replaceChildren(queryNode);
  try {
    const hasIndex = Boolean((await health)?.index);
    const [tags, similar] = await Promise.all([api("tag", request()), hasIndex ? api("similar", request()) : Promise.resolve(null)]);
    renderTags(tags);
    renderSimilar(similar);
    setState("done", `${tags.tags.length} tags, ${similar ? similar.neighbours.length : 0} similar listings`);
  } catch (e) {
    document.getElementById("tags").replaceChildren();
    document.getElementById("similar").replaceChildren();
    setState("error", `${e.code}: ${e.message}`);
  }
}

function lookAtFile(file, health) {
  // Always bytes: the server must never take an uploaded file for a JSON query.
  const request = () => ({ method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file });
  const preview = el("img", { alt: file.name, src: URL.createObjectURL(file) });
  return look(request, el("div", {}, preview, el("div", {}, file.name)), health);
}

function lookAtListing(listingId, health) {
  const request = () => ({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ listing_id: listingId }) });
  const node = el("div", {}, el("img", { alt: listingId, src: `thumb/${encodeURIComponent(listingId)}` }), el("div", {}, `listing ${listingId}`));
  return look(request, node, health);
}

function initLook() {
  // The listeners go on before the health check answers: a photo chosen while /healthz is still on
  // its way is looked at once it answers, never dropped.
  const health = showServer();
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  input.addEventListener("change", () => input.files.length && lookAtFile(input.files[0], health));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) lookAtFile(event.dataTransfer.files[0], health);
  });
  document.getElementById("by-listing").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("listing").value.trim();
    if (id) lookAtListing(id, health);
  });
  const asked = new URLSearchParams(location.search).get("listing");
  if (asked) {
    document.getElementById("listing").value = asked;
    lookAtListing(asked, health);
  } else {
    health.then((answer) => document.body.dataset.state === "idle" && setState("idle", answer ? "ready" : "the server does not answer"));
  }
}

// ---- anomalies and duplicates -----------------------------------------------------------------
async function initAnomalies() {
  showServer();
  setState("busy", "loading...");
  try {
    const result = await api("api/anomalies?limit=50");
    document.getElementById("source").textContent = result.source;
    const body = document.querySelector("#anomalies tbody");
    for (const row of result.rows) {
      body.append(
        el(
          "tr",
          { "data-listing-id": row.listing_id, "data-rank": String(row.rank) },
          el("td", {}, String(row.rank)),
          el("td", {}, row.thumbnail ? el("img", { src: row.thumbnail, alt: row.listing_id }) : "-"),
          el("td", {}, el("a", { href: `./?listing=${encodeURIComponent(row.listing_id)}` }, row.listing_id)),
          el("td", {}, row.score.toFixed(4)),
          el("td", {}, row.is_outlier ? "outlier" : ""),
        ),
      );
    }
    setState("done", `${result.rows.length} listings`);
  } catch (e) {
    setState("error", `${e.code}: ${e.message}`);
  }
}

async function initDuplicates() {
  showServer();
  setState("busy", "loading...");
  try {
    const result = await api("api/duplicates?limit=50");
    document.getElementById("source").textContent = result.source;
    const groups = document.getElementById("groups");
    for (const group of result.groups) {
      const row = el("div", { class: "group", "data-group-id": String(group.group_id) }, el("strong", {}, `group ${group.group_id}`));
      for (const m of group.members) row.append(figure(m.listing_id, m.thumbnail, `max similarity ${m.max_similarity.toFixed(4)}`));
      groups.append(row);
    }
    setState("done", `${result.groups.length} groups`);
  } catch (e) {
    setState("error", `${e.code}: ${e.message}`);
  }
}

const init = { look: initLook, anomalies: initAnomalies, duplicates: initDuplicates }[document.body.dataset.page];
if (init) init();
