// Keyboard shortcuts and click-to-rank for the labelling page. The form works without this script (radio
// buttons and selects); the script only makes it faster.
(function () {
  "use strict";
  const form = document.getElementById("label-form");
  if (!form) return;
  const kind = form.dataset.kind;
  const typing = (el) => el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "radio"));

  // Ranking: each click (or number key) gives the next rank to a response; ctrl/shift-click ties it with the
  // previous pick. The selects hold the ranks, counted from 1.
  const cards = Array.from(form.querySelectorAll(".response"));
  let nextRank = 1;
  let lastRank = 0;
  function pick(card, tie) {
    const select = card.querySelector("select");
    if (!select || select.value) return;
    const rank = tie && lastRank ? lastRank : nextRank++;
    select.value = String(rank);
    lastRank = rank;
    card.classList.add("ranked");
    document.getElementById("badge-" + card.dataset.position).textContent = String(rank);
  }
  function resetRanks() {
    cards.forEach((card) => {
      card.querySelector("select").value = "";
      card.classList.remove("ranked");
      document.getElementById("badge-" + card.dataset.position).textContent = "";
    });
    nextRank = 1;
    lastRank = 0;
  }
  if (kind === "ranking") {
    cards.forEach((card) =>
      card.addEventListener("click", (ev) => {
        if (ev.target.tagName !== "SELECT" && ev.target.tagName !== "OPTION") pick(card, ev.ctrlKey || ev.shiftKey);
      })
    );
    document.getElementById("reset-ranks").addEventListener("click", resetRanks);
  }

  // Ratings: digits rate the highlighted aspect, then the next one is highlighted.
  const aspects = Array.from(form.querySelectorAll("fieldset.rating"));
  let active = 0;
  const highlight = () => aspects.forEach((f, i) => f.classList.toggle("active", i === active));
  if (aspects.length) highlight();

  // Segments: each answer is its own submit button, so a key presses one; one answer per page, however fast
  // the keys come.
  let sent = false;
  form.addEventListener("submit", (ev) => {
    if (kind === "segment" && sent) ev.preventDefault();
    sent = true;
  });

  document.addEventListener("keydown", (ev) => {
    if (typing(document.activeElement) || ev.altKey || ev.metaKey || ev.ctrlKey) return;
    if (kind === "segment") {
      const button = form.querySelector(`button[data-key="${CSS.escape(ev.key.toLowerCase())}"]`);
      if (button) {
        ev.preventDefault();
        form.requestSubmit(button);
      }
      return;
    }
    if (ev.key === "Enter") {
      ev.preventDefault();
      form.requestSubmit();
      return;
    }
    if (kind === "ranking") {
      if (ev.key === "0") resetRanks();
      const n = parseInt(ev.key, 10);
      if (n >= 1 && n <= cards.length) pick(cards[n - 1], ev.shiftKey);
      return;
    }
    if (kind === "ratings") {
      const n = parseInt(ev.key, 10);
      if (n >= 1 && n <= 7 && aspects[active]) {
        aspects[active].querySelector(`input[value="${n}"]`).checked = true;
        active = Math.min(active + 1, aspects.length - 1);
        highlight();
      }
      return;
    }
    const input = form.querySelector(`input[data-key="${CSS.escape(ev.key.toLowerCase())}"]`);
    if (input) {
      input.checked = true;
      ev.preventDefault();
    }
  });
})();
