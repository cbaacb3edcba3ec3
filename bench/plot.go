package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// writePNG draws the latency distributions (a CDF per load, log scale) next
// to the throughput bars and the database's WAL per event.
func (r *results) writePNG(path string) error {
	lat, err := r.latencyPlot()
	if err != nil {
		return err
	}
	thr, err := r.throughputPlot()
	if err != nil {
		return err
	}
	wal, err := r.walPlot()
	if err != nil {
		return err
	}
	img := vgimg.New(vg.Points(1600), vg.Points(480))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 1, Cols: 3, PadX: vg.Points(24), PadTop: vg.Points(8), PadBottom: vg.Points(8), PadLeft: vg.Points(8), PadRight: vg.Points(8)}
	plots := [][]*plot.Plot{{lat, thr, wal}}
	canvases := plot.Align(plots, tiles, dc)
	lat.Draw(canvases[0][0])
	thr.Draw(canvases[0][1])
	wal.Draw(canvases[0][2])
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func (r *results) latencyPlot() (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "Latency: COMMIT returned → consumer received"
	p.X.Label.Text = "latency (ms, log scale)"
	p.Y.Label.Text = "fraction of events ≤ latency"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Y.Min, p.Y.Max = 0, 1
	p.Legend.Top = false
	p.Legend.Left = false
	p.Add(plotter.NewGrid())
	for i, sc := range r.Latency {
		var all []int64
		for _, run := range sc.Runs {
			all = append(all, run.samples...)
		}
		if len(all) == 0 {
			continue
		}
		sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
		const points = 500
		pts := make(plotter.XYs, 0, points+1)
		for k := 0; k <= points; k++ {
			idx := int(math.Round(float64(k) / points * float64(len(all)-1)))
			ms := math.Max(float64(all[idx])/1e6, 0.01)
			pts = append(pts, plotter.XY{X: ms, Y: float64(idx+1) / float64(len(all))})
		}
		line, err := plotter.NewLine(pts)
		if err != nil {
			return nil, err
		}
		line.Color = plotutil.Color(i)
		line.Width = vg.Points(1.5)
		if sc.Design != "relay" {
			line.Dashes = []vg.Length{vg.Points(4), vg.Points(2)}
		}
		p.Add(line)
		p.Legend.Add(fmt.Sprintf("%s, %.0f ev/s, %d/tx (p99 %.2f ms)", sc.Design, sc.Rate, sc.TxRows, sc.Median.P99ms), line)
	}
	return p, nil
}

func (r *results) throughputPlot() (*plot.Plot, error) {
	s := r.Summary
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Drain of %d events (medians of %d runs)", r.Options.N, r.Options.Repeat)
	p.Y.Label.Text = "events/s"
	names := []string{"outbox-relay", fmt.Sprintf("broker, window %d", r.Options.Window), "broker, no confirms", "polling design"}
	vals := plotter.Values{s.DrainRate, s.BrokerConfirms, s.BrokerNoConfirms, s.PollRate}
	for i, v := range vals {
		if math.IsNaN(v) {
			vals[i] = 0
		}
	}
	bars, err := plotter.NewBarChart(vals, vg.Points(60))
	if err != nil {
		return nil, err
	}
	bars.Color = plotutil.Color(0)
	bars.LineStyle.Width = 0
	p.Add(plotter.NewGrid(), bars)
	p.NominalX(names...)
	labels := make([]string, len(vals))
	xys := make(plotter.XYs, len(vals))
	for i, v := range vals {
		labels[i] = num(v, 0)
		xys[i] = plotter.XY{X: float64(i), Y: v}
	}
	l, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: labels})
	if err != nil {
		return nil, err
	}
	for i := range l.TextStyle {
		l.TextStyle[i].XAlign = draw.XCenter
		l.TextStyle[i].YAlign = draw.YBottom
	}
	p.Add(l)
	p.Y.Tick.Marker = plot.TickerFunc(func(min, max float64) []plot.Tick {
		ticks := plot.DefaultTicks{}.Ticks(min, max)
		for i := range ticks {
			if ticks[i].Label != "" {
				ticks[i].Label = num(ticks[i].Value, 0)
			}
		}
		return ticks
	})
	p.Y.Min = 0
	p.Y.Max = math.Max(vals[0], math.Max(vals[1], vals[2])) * 1.15
	return p, nil
}

// walPlot: WAL bytes per event, the producer's inserts beside each
// design's own writes (medians of the drains).
func (r *results) walPlot() (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "Database: WAL per event (medians of the drains)"
	p.Y.Label.Text = "bytes of WAL per event"
	designs := []struct {
		name string
		d    []drainRun
	}{{"relay, mark", r.Drain}, {"relay, delete", r.DrainDelete}, {"polling design", r.Poll}}
	var ins, own plotter.Values
	var names []string
	for _, x := range designs {
		names = append(names, x.name)
		ins = append(ins, zeroNaN(median(collect(x.d, func(d drainRun) float64 { return d.Cost.WALInsertBytes }))))
		own = append(own, zeroNaN(median(collect(x.d, func(d drainRun) float64 { return d.Cost.WALOwnBytes }))))
	}
	w := vg.Points(40)
	bi, err := plotter.NewBarChart(ins, w)
	if err != nil {
		return nil, err
	}
	bi.Color, bi.LineStyle.Width, bi.Offset = plotutil.Color(1), 0, -w/2
	bo, err := plotter.NewBarChart(own, w)
	if err != nil {
		return nil, err
	}
	bo.Color, bo.LineStyle.Width, bo.Offset = plotutil.Color(0), 0, w/2
	p.Add(plotter.NewGrid(), bi, bo)
	p.Legend.Add("the producer's inserts", bi)
	p.Legend.Add("the design's own writes (marks, deletes)", bo)
	p.Legend.Top = true
	p.NominalX(names...)
	p.Y.Min = 0
	p.Y.Max = 1.35 * math.Max(maxOf(ins), maxOf(own))
	return p, nil
}

func zeroNaN(v float64) float64 {
	if math.IsNaN(v) {
		return 0
	}
	return v
}

func maxOf(v plotter.Values) float64 {
	m := 0.0
	for _, x := range v {
		m = math.Max(m, x)
	}
	return m
}
