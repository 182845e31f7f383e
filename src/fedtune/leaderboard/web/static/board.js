// fedtune leaderboard: sortable table and auto-applied filters. The page works without this script
// (server-side order and the filter form's Apply button); it only adds interaction.
"use strict";

(function () {
  function cellValue(row, index, type) {
    const cell = row.cells[index];
    const raw = cell ? cell.getAttribute("data-v") || "" : "";
    if (type === "num") {
      const number = parseFloat(raw);
      return Number.isNaN(number) ? Number.POSITIVE_INFINITY : number;
    }
    return raw.toLowerCase();
  }

  function sortBy(table, header) {
    const headers = Array.from(table.tHead.rows[0].cells);
    const index = headers.indexOf(header);
    const type = header.getAttribute("data-type");
    // First click: numbers high-to-low except Rank and columns marked data-first="ascending"
    // (and text A-Z); then alternate.
    const current = header.getAttribute("aria-sort");
    const firstDescending = type === "num" && header.getAttribute("data-key") !== "rank" &&
      header.getAttribute("data-first") !== "ascending";
    let descending;
    if (current === "none") descending = firstDescending;
    else descending = current === "ascending";
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.forEach(function (row, i) { row.dataset.pos = String(i); });
    rows.sort(function (a, b) {
      const va = cellValue(a, index, type);
      const vb = cellValue(b, index, type);
      if (va < vb) return descending ? 1 : -1;
      if (va > vb) return descending ? -1 : 1;
      return Number(a.dataset.pos) - Number(b.dataset.pos); // stable: keep rank order on ties
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  function init() {
    const table = document.getElementById("board");
    if (table) {
      table.tHead.querySelectorAll("th").forEach(function (header) {
        const button = header.querySelector("button.sort");
        if (button) button.addEventListener("click", function () { sortBy(table, header); });
      });
      // A name cut short with an ellipsis shows in full on a tap or click (and back again).
      table.tBodies[0].addEventListener("click", function (event) {
        const clip = event.target.closest(".clip");
        if (clip) clip.classList.toggle("open");
      });
    }
    const form = document.getElementById("filters");
    if (form) {
      form.querySelectorAll("select").forEach(function (select) {
        select.addEventListener("change", function () {
          if (select.name === "track") {
            const model = form.querySelector("select[name=model]");
            if (model) model.value = "";
          }
          form.submit();
        });
      });
      const apply = form.querySelector("button.apply");
      if (apply) apply.hidden = true;
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
