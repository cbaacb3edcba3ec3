package config

import (
	"fmt"
	"strings"
)

// RoutingKey is a compiled RELAY_ROUTING_KEY template.
type RoutingKey struct {
	parts []keyPart
}

type keyPart struct {
	literal string
	field   int // 0 literal, else one of the field constants
}

const (
	fieldAggregateType = iota + 1
	fieldEventType
	fieldAggregateID
)

var fields = map[string]int{
	"aggregate_type": fieldAggregateType,
	"event_type":     fieldEventType,
	"aggregate_id":   fieldAggregateID,
}

// ParseRoutingKey compiles a template such as "{aggregate_type}.{event_type}".
func ParseRoutingKey(tmpl string) (RoutingKey, error) {
	var k RoutingKey
	rest := tmpl
	for rest != "" {
		open := strings.IndexByte(rest, '{')
		if open < 0 {
			k.parts = append(k.parts, keyPart{literal: rest})
			break
		}
		if open > 0 {
			k.parts = append(k.parts, keyPart{literal: rest[:open]})
		}
		end := strings.IndexByte(rest[open:], '}')
		if end < 0 {
			return k, fmt.Errorf("unclosed '{' in %q", tmpl)
		}
		name := rest[open+1 : open+end]
		f, ok := fields[name]
		if !ok {
			return k, fmt.Errorf("unknown placeholder {%s} in %q (known: {aggregate_type}, {event_type}, {aggregate_id})", name, tmpl)
		}
		k.parts = append(k.parts, keyPart{field: f})
		rest = rest[open+end+1:]
	}
	return k, nil
}

// Render fills the template.
func (k RoutingKey) Render(aggregateType, eventType, aggregateID string) string {
	if len(k.parts) == 1 && k.parts[0].field == 0 {
		return k.parts[0].literal
	}
	n := 0
	for _, p := range k.parts {
		n += len(p.value(aggregateType, eventType, aggregateID))
	}
	var b strings.Builder
	b.Grow(n) // one allocation per key
	for _, p := range k.parts {
		b.WriteString(p.value(aggregateType, eventType, aggregateID))
	}
	return b.String()
}

func (p keyPart) value(aggregateType, eventType, aggregateID string) string {
	switch p.field {
	case fieldAggregateType:
		return aggregateType
	case fieldEventType:
		return eventType
	case fieldAggregateID:
		return aggregateID
	}
	return p.literal
}
