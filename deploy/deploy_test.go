package deploy

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// exported returns every series name the relay exports: each metric of
// metrics.New (labelled vectors too, which Gather omits until a child
// exists), histograms with their _bucket, _sum and _count series.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New()
	names := map[string]bool{}
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		names[f.GetName()] = true
		if f.GetType() == dto.MetricType_HISTOGRAM {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[f.GetName()+s] = true
			}
		}
	}
	fqName := regexp.MustCompile(`fqName: "([^"]+)"`)
	v := reflect.ValueOf(m).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		if !f.CanInterface() {
			continue
		}
		c, ok := f.Interface().(prometheus.Collector)
		if !ok || f.IsNil() {
			continue
		}
		ch := make(chan *prometheus.Desc, 8)
		go func() { c.Describe(ch); close(ch) }()
		for d := range ch {
			if sm := fqName.FindStringSubmatch(d.String()); sm != nil {
				names[sm[1]] = true
				if _, isHist := c.(*prometheus.HistogramVec); isHist {
					for _, s := range []string{"_bucket", "_sum", "_count"} {
						names[sm[1]+s] = true
					}
				}
			}
		}
	}
	if !names["outbox_relay_events_published_total"] || !names["outbox_relay_events_dead_lettered_total"] {
		t.Fatalf("could not list the exported metrics: %v", names)
	}
	return names
}

// Series names a PromQL expression uses: identifiers in the relay's
// (outbox_relay_), the Go (go_) and process (process_) namespaces.
var seriesName = regexp.MustCompile(`\b(?:outbox_relay|go|process)_[a-zA-Z0-9_]+\b`)

func checkExpr(t *testing.T, where, expr string, names map[string]bool) {
	t.Helper()
	found := seriesName.FindAllString(expr, -1)
	for _, n := range found {
		if !names[n] {
			t.Errorf("%s: %s is not a metric the relay exports (expr %q)", where, n, expr)
		}
	}
	if len(found) == 0 && !strings.Contains(expr, "up{") {
		t.Errorf("%s: expression uses no relay metric: %q", where, expr)
	}
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func TestAlertRules(t *testing.T) {
	names := exported(t)
	var rf ruleFile
	readYAML(t, filepath.Join("prometheus", "alerts.yml"), &rf)
	alerts := map[string]bool{}
	var used []string
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" {
				t.Errorf("group %s: a rule without alert or expr: %+v", g.Name, r)
				continue
			}
			if alerts[r.Alert] {
				t.Errorf("alert %s defined twice", r.Alert)
			}
			alerts[r.Alert] = true
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("alert %s: severity %q, want warning or critical", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || !strings.HasPrefix(r.Annotations["runbook"], "docs/operating.md#") {
				t.Errorf("alert %s: needs a summary and a runbook in docs/operating.md", r.Alert)
			}
			checkExpr(t, "alert "+r.Alert, r.Expr, names)
			used = append(used, seriesName.FindAllString(r.Expr, -1)...)
		}
	}
	// What the issue asks alerts for.
	for _, m := range []string{"outbox_relay_replication_lag_bytes", "outbox_relay_slot_wal_retained_bytes",
		"outbox_relay_oldest_unpublished_age_seconds", "outbox_relay_events_dead_lettered_total", "outbox_relay_standby"} {
		if !contains(used, m) {
			t.Errorf("no alert on %s", m)
		}
	}
	if !alerts["OutboxRelayDown"] || !alerts["OutboxRelayAbsent"] {
		t.Error("no alert for the relay being down or absent")
	}

	// Every runbook anchor exists in docs/operating.md.
	doc, err := os.ReadFile(filepath.Join("..", "docs", "operating.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			_, anchor, _ := strings.Cut(r.Annotations["runbook"], "#")
			if !strings.Contains(strings.ToLower(string(doc)), "### "+anchor) {
				t.Errorf("alert %s: runbook anchor #%s has no \"### %s\" heading in docs/operating.md", r.Alert, anchor, anchor)
			}
		}
	}
}

func TestPrometheusConfig(t *testing.T) {
	var cfg struct {
		Global        map[string]string `yaml:"global"`
		RuleFiles     []string          `yaml:"rule_files"`
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			MetricsPath   string `yaml:"metrics_path"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	readYAML(t, filepath.Join("prometheus", "prometheus.yml"), &cfg)
	for _, f := range cfg.RuleFiles {
		if _, err := os.Stat(filepath.Join("prometheus", f)); err != nil {
			t.Errorf("rule file %s: %v", f, err)
		}
	}
	if len(cfg.ScrapeConfigs) != 1 || cfg.ScrapeConfigs[0].JobName != "outbox-relay" ||
		len(cfg.ScrapeConfigs[0].StaticConfigs) != 1 || !contains(cfg.ScrapeConfigs[0].StaticConfigs[0].Targets, "relay:9740") {
		t.Errorf("want one scrape job outbox-relay (the alerts select on it) for relay:9740, got %+v", cfg.ScrapeConfigs)
	}
}

func TestGrafanaProvisioning(t *testing.T) {
	var ds struct {
		APIVersion  int `yaml:"apiVersion"`
		Datasources []struct {
			Name      string `yaml:"name"`
			UID       string `yaml:"uid"`
			Type      string `yaml:"type"`
			Access    string `yaml:"access"`
			URL       string `yaml:"url"`
			IsDefault bool   `yaml:"isDefault"`
			Editable  bool   `yaml:"editable"`
		} `yaml:"datasources"`
	}
	readYAML(t, filepath.Join("grafana", "provisioning", "datasources", "prometheus.yml"), &ds)
	if ds.APIVersion != 1 || len(ds.Datasources) != 1 || ds.Datasources[0].UID != "prometheus" || ds.Datasources[0].Type != "prometheus" {
		t.Errorf("datasource provisioning: %+v", ds)
	}
	var dp struct {
		APIVersion int `yaml:"apiVersion"`
		Providers  []struct {
			Name            string         `yaml:"name"`
			Folder          string         `yaml:"folder"`
			Type            string         `yaml:"type"`
			DisableDeletion bool           `yaml:"disableDeletion"`
			AllowUIUpdates  bool           `yaml:"allowUiUpdates"`
			Options         map[string]any `yaml:"options"`
		} `yaml:"providers"`
	}
	readYAML(t, filepath.Join("grafana", "provisioning", "dashboards", "outbox-relay.yml"), &dp)
	if dp.APIVersion != 1 || len(dp.Providers) != 1 || dp.Providers[0].Type != "file" || dp.Providers[0].Options["path"] == nil {
		t.Errorf("dashboard provisioning: %+v", dp)
	}
}

func TestGrafanaDashboard(t *testing.T) {
	names := exported(t)
	b, err := os.ReadFile(filepath.Join("grafana", "dashboards", "outbox-relay.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			GridPos struct{ X, Y, W, H int } `json:"gridPos"`
			Targets []struct {
				Expr  string `json:"expr"`
				RefID string `json:"refId"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	if d.UID == "" || d.Title == "" || len(d.Panels) == 0 {
		t.Fatalf("dashboard needs a uid, a title and panels")
	}
	ids := map[int]bool{}
	var used []string
	for _, p := range d.Panels {
		where := "panel " + p.Title
		if ids[p.ID] {
			t.Errorf("%s: duplicate id %d", where, p.ID)
		}
		ids[p.ID] = true
		if p.Datasource.UID != "prometheus" {
			t.Errorf("%s: datasource uid %q, want the provisioned \"prometheus\"", where, p.Datasource.UID)
		}
		if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("%s: bad gridPos %+v", where, p.GridPos)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: no queries", where)
		}
		for _, tg := range p.Targets {
			checkExpr(t, where, tg.Expr, names)
			used = append(used, seriesName.FindAllString(tg.Expr, -1)...)
		}
	}
	// What the issue asks the dashboard to show.
	for _, m := range []string{
		"outbox_relay_events_published_total", "outbox_relay_replication_lag_bytes",
		"outbox_relay_slot_wal_retained_bytes", "outbox_relay_publish_confirm_seconds_bucket",
		"outbox_relay_event_delivery_seconds_bucket", "outbox_relay_unpublished_rows",
		"outbox_relay_oldest_unpublished_age_seconds", "outbox_relay_reconnects_total",
		"outbox_relay_retries_total", "outbox_relay_events_dead_lettered_total", "outbox_relay_standby",
	} {
		if !contains(used, m) {
			t.Errorf("no dashboard panel queries %s", m)
		}
	}
}

// docker-compose.yml's relay profile runs Prometheus and Grafana on these
// files; the mounts must exist, and the relay polls status for the gauges.
func TestComposeMountsTheseFiles(t *testing.T) {
	var c struct {
		Services map[string]struct {
			Profiles    []string          `yaml:"profiles"`
			Environment map[string]string `yaml:"environment"`
			Volumes     []string          `yaml:"volumes"`
		} `yaml:"services"`
	}
	b, err := os.ReadFile(filepath.Join("..", "docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	relay := c.Services["relay"]
	if relay.Environment["RELAY_DATABASE_URL"] == "" || relay.Environment["RELAY_STATUS_POLL_INTERVAL"] == "" {
		t.Errorf("relay service: environment %v, want the shared RELAY_* and RELAY_STATUS_POLL_INTERVAL", relay.Environment)
	}
	for _, name := range []string{"prometheus", "grafana"} {
		svc, ok := c.Services[name]
		if !ok || !contains(svc.Profiles, "relay") {
			t.Errorf("service %s missing or not in the relay profile", name)
			continue
		}
		if len(svc.Volumes) == 0 {
			t.Errorf("service %s mounts nothing", name)
		}
		for _, v := range svc.Volumes {
			src, _, _ := strings.Cut(v, ":")
			if _, err := os.Stat(filepath.Join("..", src)); err != nil {
				t.Errorf("service %s mounts %s: %v", name, src, err)
			}
		}
	}
}

// promtool is optional here (the Debian package prometheus ships it); when
// present it checks PromQL syntax and runs the alert unit tests.
func TestPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool not on PATH under CI: .ci/run installs it (apt-get install prometheus)")
		}
		t.Skip("promtool not on PATH (apt-get install prometheus): PromQL syntax and alerts_test.yml not checked")
	}
	for _, args := range [][]string{
		{"check", "config", "prometheus.yml"},
		{"check", "rules", "alerts.yml"},
		{"test", "rules", "alerts_test.yml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "prometheus"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

func contains(list []string, s string) bool {
	sorted := append([]string(nil), list...)
	sort.Strings(sorted)
	i := sort.SearchStrings(sorted, s)
	return i < len(sorted) && sorted[i] == s
}
