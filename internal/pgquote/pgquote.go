// Package pgquote quotes values into SQL text, for the few statements that
// take no parameters: the replication protocol's commands, SET TRANSACTION
// SNAPSHOT, a cursor's DECLARE, and the migrations' templates.
package pgquote

import "strings"

// Literal quotes s as an SQL string literal (standard_conforming_strings,
// on by default since PostgreSQL 9.1).
func Literal(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}
