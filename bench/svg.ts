/**
 * A small SVG line-plot writer for the benchmark report: linear or log axes, several series
 * with markers, horizontal reference lines and a legend. Standalone SVG 1.1, no scripts, no
 * external fonts, so GitHub renders the files inline in bench/RESULTS.md.
 */

export interface Series {
  name: string;
  points: readonly (readonly [number, number])[];
  /** Draw dashed (e.g. a baseline); markers are drawn either way. */
  dashed?: boolean;
}

export interface ReferenceLine { y: number; label: string }

export interface LinePlot {
  title: string;
  xLabel: string;
  yLabel: string;
  series: readonly Series[];
  xLog?: boolean;
  yLog?: boolean;
  /** Horizontal lines (e.g. the copy-bandwidth ceiling). */
  lines?: readonly ReferenceLine[];
  width?: number;
  height?: number;
  /** Formats tick values (default: 1K / 1M / 1G suffixes). */
  format?: (v: number) => string;
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const MARKERS = ['circle', 'square', 'triangle', 'diamond'] as const;

/** Escapes text for SVG element content and attribute values. */
export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

/** 1536 -> "1.5K", 2 ** 20 -> "1M" (binary for exact powers of two, else decimal). */
export function formatTick(v: number): string {
  if (v === 0) return '0';
  const a = Math.abs(v);
  const pow2 = Number.isInteger(Math.log2(a)) && a >= 1024;
  const base = pow2 ? 1024 : 1000;
  for (const [k, s] of [[3, 'G'], [2, 'M'], [1, 'K']] as const) {
    const d = base ** k;
    if (a >= d) return `${trim(v / d)}${s}`;
  }
  return trim(v);
}

function trim(v: number): string {
  const a = Math.abs(v);
  const s = a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
  return s.includes('.') && !s.includes('e') ? s.replace(/\.?0+$/, '') : s;
}

interface Axis { lo: number; hi: number; log: boolean; ticks: number[] }

function axis(values: number[], log: boolean): Axis {
  const vs = values.filter((v) => Number.isFinite(v) && (!log || v > 0));
  let lo = vs.length ? Math.min(...vs) : 1, hi = vs.length ? Math.max(...vs) : 10;
  if (log) {
    const base = hi / lo > 1e3 ? 10 : 2;
    const l = Math.floor(Math.log(lo) / Math.log(base) + 1e-9), h = Math.ceil(Math.log(hi) / Math.log(base) - 1e-9);
    const hh = h === l ? l + 1 : h;
    let ticks: number[] = [];
    for (let e = l; e <= hh; e++) ticks.push(base ** e);
    while (ticks.length > 9) ticks = ticks.filter((_, i) => i % 2 === 0);
    return { lo: base ** l, hi: base ** hh, log, ticks };
  }
  if (lo > 0 && lo < hi * 0.5) lo = 0;
  if (hi === lo) hi = lo + 1;
  const raw = (hi - lo) / 5, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step) * step;
  const ticks: number[] = [];
  for (let t = lo; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return { lo, hi, log, ticks };
}

function scale(a: Axis, from: number, to: number): (v: number) => number {
  if (a.log) {
    const l = Math.log(a.lo), h = Math.log(a.hi);
    return (v) => from + ((Math.log(v) - l) / (h - l)) * (to - from);
  }
  return (v) => from + ((v - a.lo) / (a.hi - a.lo)) * (to - from);
}

function marker(kind: (typeof MARKERS)[number], x: number, y: number, color: string): string {
  const f = (n: number) => n.toFixed(1);
  switch (kind) {
    case 'circle': return `<circle cx="${f(x)}" cy="${f(y)}" r="3.2" fill="${color}"/>`;
    case 'square': return `<rect x="${f(x - 3)}" y="${f(y - 3)}" width="6" height="6" fill="${color}"/>`;
    case 'triangle': return `<path d="M${f(x)},${f(y - 3.8)}L${f(x + 3.5)},${f(y + 2.8)}L${f(x - 3.5)},${f(y + 2.8)}Z" fill="${color}"/>`;
    case 'diamond': return `<path d="M${f(x)},${f(y - 4)}L${f(x + 4)},${f(y)}L${f(x)},${f(y + 4)}L${f(x - 4)},${f(y)}Z" fill="${color}"/>`;
  }
}

/**
 * Renders a line plot as a standalone SVG document. Points with a non-finite coordinate (or
 * <= 0 on a log axis) are skipped; every series still gets its `<g class="series">` group and
 * legend entry, so a reader can count them.
 */
export function linePlot(p: LinePlot): string {
  const W = p.width ?? 720, H = p.height ?? 420;
  const legendRows = Math.ceil(p.series.length / 2);
  const m = { left: 72, right: 20, top: 36, bottom: 52 + 18 * legendRows };
  const ok = (x: number, y: number) => Number.isFinite(x) && Number.isFinite(y) && (!p.xLog || x > 0) && (!p.yLog || y > 0);
  const pts = p.series.flatMap((s) => s.points.filter(([x, y]) => ok(x, y)));
  const xa = axis(pts.map(([x]) => x), !!p.xLog);
  const ya = axis([...pts.map(([, y]) => y), ...(p.lines ?? []).map((l) => l.y)], !!p.yLog);
  const sx = scale(xa, m.left, W - m.right), sy = scale(ya, H - m.bottom, m.top);
  const fmt = p.format ?? formatTick;
  const f = (n: number) => n.toFixed(1);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`);
  out.push(`<title>${escapeXml(p.title)}</title>`);
  out.push(`<rect width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${escapeXml(p.title)}</text>`);
  out.push('<g class="grid" stroke="#e0e0e0" stroke-width="1">');
  for (const t of xa.ticks) out.push(`<line x1="${f(sx(t))}" y1="${m.top}" x2="${f(sx(t))}" y2="${H - m.bottom}"/>`);
  for (const t of ya.ticks) out.push(`<line x1="${m.left}" y1="${f(sy(t))}" x2="${W - m.right}" y2="${f(sy(t))}"/>`);
  out.push('</g>');
  out.push(`<g class="axes" stroke="#333333" fill="none"><rect x="${m.left}" y="${m.top}" width="${W - m.left - m.right}" height="${H - m.top - m.bottom}"/></g>`);
  out.push('<g class="ticks" fill="#333333">');
  for (const t of xa.ticks) out.push(`<text x="${f(sx(t))}" y="${H - m.bottom + 16}" text-anchor="middle">${escapeXml(fmt(t))}</text>`);
  for (const t of ya.ticks) out.push(`<text x="${m.left - 6}" y="${f(sy(t) + 4)}" text-anchor="end">${escapeXml(fmt(t))}</text>`);
  out.push('</g>');
  out.push(`<text x="${(m.left + W - m.right) / 2}" y="${H - m.bottom + 34}" text-anchor="middle">${escapeXml(p.xLabel)}</text>`);
  out.push(`<text transform="translate(16 ${(m.top + H - m.bottom) / 2}) rotate(-90)" text-anchor="middle">${escapeXml(p.yLabel)}</text>`);
  for (const l of p.lines ?? []) {
    if (!ok(xa.lo, l.y)) continue;
    const y = sy(l.y);
    out.push(`<g class="reference"><line x1="${m.left}" y1="${f(y)}" x2="${W - m.right}" y2="${f(y)}" stroke="#000000" stroke-width="1.5" stroke-dasharray="2 3"/>` +
      `<text x="${W - m.right - 4}" y="${f(y - 5)}" text-anchor="end">${escapeXml(l.label)}</text></g>`);
  }
  p.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length]!, mk = MARKERS[i % MARKERS.length]!;
    const sp = s.points.filter(([x, y]) => ok(x, y)).map(([x, y]) => [sx(x), sy(y)] as const);
    out.push(`<g class="series" data-name="${escapeXml(s.name)}">`);
    if (sp.length > 1) {
      out.push(`<polyline fill="none" stroke="${color}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''} points="${sp.map(([x, y]) => `${f(x)},${f(y)}`).join(' ')}"/>`);
    }
    for (const [x, y] of sp) out.push(marker(mk, x, y, color));
    out.push('</g>');
  });
  out.push('<g class="legend">');
  p.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length]!;
    const x = m.left + (i % 2) * ((W - m.left - m.right) / 2), y = H - m.bottom + 52 + 18 * Math.floor(i / 2);
    out.push(`<line x1="${x}" y1="${y - 4}" x2="${x + 22}" y2="${y - 4}" stroke="${color}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''}/>` +
      marker(MARKERS[i % MARKERS.length]!, x + 11, y - 4, color) +
      `<text x="${x + 28}" y="${y}">${escapeXml(s.name)}</text>`);
  });
  out.push('</g>');
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}
