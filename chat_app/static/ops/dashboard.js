// The operator dashboard: fetches /ops/api/summary every 5 s and redraws, without reloading.
// No inline script or style (the Content-Security-Policy forbids both): text goes in with
// textContent, looks come from dashboard.css, and uPlot styles its own elements through the DOM.
// What each chart was given is written back on its figure (data-totals, data-latest), so a test,
// or a curious operator, can read the numbers the page drew.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const HEIGHT = 240;
  // drawn in this order: failures last, on top of the others
  const OUTCOMES = [
    ["sent", "#2e7d32"], ["skipped", "#757575"], ["retried", "#ef6c00"], ["failed", "#c62828"],
  ];
  const QUEUE = [
    ["pending_deliveries", "pending deliveries", "#1565c0", "n"],
    ["pending_jobs", "pending jobs", "#6a1b9a", "n"],
    ["oldest_pending_age", "oldest pending (s)", "#00838f", "s"],
  ];
  const charts = {};

  const byId = (id) => document.getElementById(id);
  const sum = (values) => values.reduce((total, v) => total + (v || 0), 0);
  const lastValue = (values) => {
    for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
    return null;
  };

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "–";
  }

  function chartWidth(figure) {
    return Math.max(300, figure.clientWidth);
  }

  function deliveriesOptions(figure) {
    return {
      width: chartWidth(figure),
      height: HEIGHT,
      scales: { x: { time: true } },
      series: [{}, ...OUTCOMES.map(([label, color]) => ({
        label, stroke: color, width: 2, points: { show: true, size: 5, fill: color },
      }))],
      axes: [{}, { label: "deliveries / minute" }],
    };
  }

  function queueOptions(figure) {
    return {
      width: chartWidth(figure),
      height: HEIGHT,
      scales: { x: { time: true } },
      series: [{}, ...QUEUE.map(([, label, color, scale]) => ({
        label, stroke: color, width: 2, scale, points: { show: true, size: 5, fill: color },
      }))],
      axes: [{}, { scale: "n", label: "pending" }, { scale: "s", side: 1, label: "seconds", grid: { show: false } }],
    };
  }

  // draw on first use, then only swap the data: uPlot keeps its canvas and legend
  function draw(name, figure, options, data) {
    if (charts[name]) {
      charts[name].setData(data);
    } else {
      charts[name] = new uPlot(options(figure), data, figure);
    }
    return charts[name];
  }

  function renderDeliveries(summary) {
    const figure = byId("deliveries-chart");
    const data = [summary.minutes, ...OUTCOMES.map(([outcome]) => summary.deliveries[outcome])];
    const chart = draw("deliveries", figure, deliveriesOptions, data);
    const drawn = {};
    OUTCOMES.forEach(([outcome], i) => { drawn[outcome] = sum(chart.data[i + 1]); });
    figure.dataset.totals = JSON.stringify(drawn);
    figure.dataset.points = String(chart.data[0].length);
    for (const cell of document.querySelectorAll("#delivery-totals dd")) {
      cell.textContent = String(summary.totals[cell.dataset.outcome]);
    }
  }

  function renderQueue(summary) {
    const queue = summary.queue;
    byId("pending-jobs").textContent = String(queue.pending_jobs);
    byId("pending-deliveries").textContent = String(queue.pending_deliveries);
    byId("oldest-pending").textContent = age(queue.oldest_pending_age);
    const figure = byId("queue-chart");
    const data = [summary.minutes, ...QUEUE.map(([key]) => queue.history[key])];
    const chart = draw("queue", figure, queueOptions, data);
    const latest = {};
    QUEUE.forEach(([key], i) => { latest[key] = lastValue(chart.data[i + 1]); });
    figure.dataset.latest = JSON.stringify(latest);
    figure.dataset.samples = String(chart.data[1].filter((v) => v !== null).length);
  }

  function fillTable(id, rows, cells) {
    const body = byId(id).querySelector("tbody");
    body.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      for (const [text, className] of cells(row)) {
        const td = document.createElement("td");
        td.textContent = text;
        if (className) td.className = className;
        tr.append(td);
      }
      return tr;
    }));
    byId(`${id}-empty`).hidden = rows.length > 0;
  }

  function renderTables(summary) {
    fillTable("failures", summary.failures, (f) => [
      [f.platform], [f.reason || "(none given)", "reason"], [String(f.count), "count"],
    ]);
    fillTable("dispatchers", summary.dispatchers, (d) => [
      [d.host_id], [String(d.pid), "count"], [when(d.started)],
      [`${when(d.last_heartbeat)} (${age(d.heartbeat_age)} ago)`],
    ]);
  }

  function renderWebhooks(summary) {
    const hooks = summary.webhooks;
    byId("webhooks-enabled").textContent = hooks.enabled ? "yes" : "no";
    byId("webhook-backlog").textContent = String(hooks.pending);
    byId("webhook-oldest").textContent = age(hooks.oldest_pending_age);
  }

  function setStatus(text, failed) {
    const status = byId("status");
    status.textContent = text;
    status.classList.toggle("error", failed);
  }

  async function refresh() {
    try {
      const answer = await fetch("api/summary", { cache: "no-store", headers: { Accept: "application/json" } });
      if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
      const summary = await answer.json();
      renderQueue(summary);
      renderDeliveries(summary);
      renderTables(summary);
      renderWebhooks(summary);
      document.body.dataset.generatedAt = summary.generated_at;
      setStatus(`updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`, false);
    } catch (error) {
      // shown, not thrown: the next refresh may well succeed (a restart, a database blip)
      setStatus(`refresh failed (${error.message}) at ${new Date().toLocaleTimeString()}; retrying`, true);
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(charts)) {
      chart.setSize({ width: chartWidth(byId(`${name}-chart`)), height: HEIGHT });
    }
  });

  refresh();
})();
