package main

import (
	"bufio"
	"fmt"
	"math"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// freeAddr returns a loopback address with a port free right now, for the
// relay's /metrics.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// bucket is one cumulative histogram bucket.
type bucket struct {
	le    float64
	count float64
}

// histogram reads the cumulative buckets of one histogram from a Prometheus
// text exposition.
func histogram(url, name string) ([]bucket, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, fmt.Errorf("scrape the relay's metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape the relay's metrics: %s", resp.Status)
	}
	var out []bucket
	prefix := name + `_bucket{le="`
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), prefix)
		if !ok {
			continue
		}
		le, value, ok := strings.Cut(rest, `"} `)
		if !ok {
			return nil, fmt.Errorf("unexpected bucket line %q", sc.Text())
		}
		b := bucket{le: math.Inf(1)}
		if le != "+Inf" {
			if b.le, err = strconv.ParseFloat(le, 64); err != nil {
				return nil, fmt.Errorf("bucket bound %q: %w", le, err)
			}
		}
		if b.count, err = strconv.ParseFloat(value, 64); err != nil {
			return nil, fmt.Errorf("bucket count %q: %w", value, err)
		}
		out = append(out, b)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s is not in the relay's metrics", name)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].le < out[j].le })
	return out, nil
}

// quantile estimates the q-quantile of the observations between two scrapes
// of the same histogram, interpolating linearly inside a bucket as
// Prometheus' histogram_quantile does. NaN if nothing was observed.
func quantile(before, after []bucket, q float64) float64 {
	if len(before) != len(after) {
		return math.NaN()
	}
	delta := make([]bucket, len(after))
	for i := range after {
		delta[i] = bucket{le: after[i].le, count: after[i].count - before[i].count}
	}
	total := delta[len(delta)-1].count
	if total <= 0 {
		return math.NaN()
	}
	rank := q * total
	lower, below := 0.0, 0.0
	for _, b := range delta {
		if b.count >= rank {
			if math.IsInf(b.le, 1) {
				return lower // beyond the last bound: the best known is that bound
			}
			if b.count == below {
				return b.le
			}
			return lower + (b.le-lower)*(rank-below)/(b.count-below)
		}
		lower, below = b.le, b.count
	}
	return lower
}

// finite maps NaN (no observations) to 0, which the table shows as n/a;
// JSON has no NaN.
func finite(v float64) float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return 0
	}
	return v
}
