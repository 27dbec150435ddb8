// Fetch a synthetic object and show the headers that say which tier answered.
"use strict";

const results = document.querySelector("#results tbody");

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null ? "-" : String(text);
  if (className) td.className = className;
  return td;
}

async function probe(url) {
  const started = performance.now();
  // no-store on the browser side so every click reaches the CDN.
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.arrayBuffer();
  const elapsed = Math.round(performance.now() - started);
  const cacheStatus = response.headers.get("Cache-Status");
  const row = document.createElement("tr");
  row.append(
    cell(url),
    cell(response.status),
    cell(body.byteLength),
    cell(elapsed),
    cell(cacheStatus, cacheStatus && /;\s*hit/.test(cacheStatus) ? "hit" : "miss"),
    cell(response.headers.get("Age")),
    cell(response.headers.get("X-Origin-Hits")),
  );
  results.prepend(row);
}

for (const button of document.querySelectorAll("button[data-url]")) {
  button.addEventListener("click", () => {
    probe(button.dataset.url).catch((error) => {
      const row = document.createElement("tr");
      row.append(cell(button.dataset.url), cell(`error: ${error.message}`));
      results.prepend(row);
    });
  });
}
