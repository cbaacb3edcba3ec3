package decoder

import (
	"bufio"
	"bytes"
	"strings"
)

// validTraceparent accepts a W3C traceparent: version-traceid-parentid-flags
// in lower-case hex, a trace id and a parent id that are not all zeros, and
// nothing after the flags but further "-" fields of a later version.
func validTraceparent(s string) bool {
	if len(s) < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-' {
		return false
	}
	if !hex(s[0:2]) || s[0:2] == "ff" || !hex(s[3:35]) || !hex(s[36:52]) || !hex(s[53:55]) {
		return false
	}
	if s[3:35] == strings.Repeat("0", 32) || s[36:52] == strings.Repeat("0", 16) {
		return false
	}
	if len(s) == 55 {
		return true
	}
	return s[0:2] != "00" && s[55] == '-' && printable(s[55:]) && s[len(s)-1] != ' '

}

// validTracestate accepts what may travel as one header value on every
// sink: at most 512 bytes of printable ASCII (W3C's limit for propagating it
// whole), without white space at its ends (NATS would trim it).
func validTracestate(s string) bool {
	return s != "" && len(s) <= 512 && printable(s) && s[0] != ' ' && s[len(s)-1] != ' '
}

func hex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// parseSpanContext reads Debezium's tracingspancontext, the span context as
// java.util.Properties text: lines of key=value (or key: value), with
// comment lines starting # or !. Only traceparent and tracestate are taken,
// and only when valid. A backslash escape (\: or \=) stands for the
// character after it; a trace context holds no \uXXXX escapes.
func parseSpanContext(b []byte) (traceparent, tracestate string) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 1024), 64<<10)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == '!' {
			continue
		}
		i := strings.IndexAny(line, "=:")
		if i < 0 {
			continue
		}
		k := strings.TrimSpace(line[:i])
		v := unescapeProperty(strings.TrimSpace(line[i+1:]))
		switch k {
		case "traceparent":
			if validTraceparent(v) {
				traceparent = v
			}
		case "tracestate":
			if validTracestate(v) {
				tracestate = v
			}
		}
	}
	if traceparent == "" {
		return "", ""
	}
	return traceparent, tracestate
}

func unescapeProperty(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
