// Package deploy holds the deployment files (not Go): least-privilege.sql,
// the Prometheus configuration and alert rules, and the Grafana provisioning
// and dashboard. Its tests validate them: they parse, and every metric they
// query is one the relay exports.
package deploy
