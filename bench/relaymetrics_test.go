package main

import (
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
)

func TestHistogramQuantileOfTheDelta(t *testing.T) {
	exposition := func(counts ...int) string {
		return "# TYPE x histogram\n" +
			`x_bucket{le="0.001"} ` + strconv.Itoa(counts[0]) + "\n" +
			`x_bucket{le="0.002"} ` + strconv.Itoa(counts[1]) + "\n" +
			`x_bucket{le="0.004"} ` + strconv.Itoa(counts[2]) + "\n" +
			`x_bucket{le="+Inf"} ` + strconv.Itoa(counts[3]) + "\n" +
			"x_sum 1\nx_count " + strconv.Itoa(counts[3]) + "\n"
	}
	body := exposition(50, 50, 50, 50)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte(body)) }))
	defer srv.Close()
	before, err := histogram(srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	// Between the scrapes: 100 observations in (0.001, 0.002], 100 in
	// (0.002, 0.004] and none elsewhere; the 50 before must not count.
	body = exposition(50, 150, 250, 250)
	after, err := histogram(srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ q, want float64 }{{0.25, 0.0015}, {0.5, 0.002}, {0.75, 0.003}, {1, 0.004}} {
		if got := quantile(before, after, c.q); math.Abs(got-c.want) > 1e-12 {
			t.Errorf("quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	if got := quantile(after, after, 0.5); !math.IsNaN(got) {
		t.Errorf("quantile with no new observations = %v, want NaN", got)
	}
	body = exposition(0, 0, 0, 10)
	inf, err := histogram(srv.URL, "x")
	if err != nil {
		t.Fatal(err)
	}
	if got := quantile(make([]bucket, 4), inf, 0.5); got != 0.004 {
		t.Errorf("quantile in the +Inf bucket = %v, want the last finite bound 0.004", got)
	}
	if _, err := histogram(srv.URL, "missing"); err == nil {
		t.Error("a histogram absent from the exposition should be an error")
	}
}
