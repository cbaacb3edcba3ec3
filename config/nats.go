package config

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// RELAY_SINK values.
const (
	SinkRabbitMQ = "rabbitmq"
	SinkNATS     = "nats"
)

// DefaultNATSSubject is RELAY_ROUTING_KEY's default when RELAY_SINK=nats.
// The subject needs a literal first token: the stream's subjects are
// derived from it (NATSStreamSubjects), and a stream capturing ">" would
// also capture every other subject on the server.
const DefaultNATSSubject = "outbox.{aggregate_type}.{event_type}"

// NATSStreamSubjects returns the subjects RELAY_NATS_STREAM captures when
// the relay creates it: the literal tokens RELAY_ROUTING_KEY starts with,
// followed by ">" ("outbox.{aggregate_type}.{event_type}" gives
// "outbox.>"), or the template itself when it has no placeholder.
func (c *Config) NATSStreamSubjects() ([]string, error) {
	tokens := strings.Split(c.RoutingKey, ".")
	var prefix []string
	for _, tok := range tokens {
		if strings.Contains(tok, "{") {
			break
		}
		if reason := subjectToken(tok); reason != "" {
			return nil, fmt.Errorf("RELAY_ROUTING_KEY %q is not a NATS subject template: %s", c.RoutingKey, reason)
		}
		prefix = append(prefix, tok)
	}
	switch {
	case len(prefix) == len(tokens):
		return []string{c.RoutingKey}, nil
	case len(prefix) == 0:
		return nil, fmt.Errorf("RELAY_ROUTING_KEY %q must start with a literal subject token, as in %q, when RELAY_SINK=nats: "+
			"the stream's subjects are that prefix followed by \">\"", c.RoutingKey, DefaultNATSSubject)
	}
	return []string{strings.Join(prefix, ".") + ".>"}, nil
}

func subjectToken(tok string) string {
	switch {
	case tok == "":
		return "empty token"
	case tok == "*" || tok == ">":
		return fmt.Sprintf("wildcard %q", tok)
	case strings.ContainsAny(tok, " \t\r\n\f\v\x00"):
		return fmt.Sprintf("white space in %q", tok)
	}
	return ""
}

func (c *Config) validateNATS() []error {
	var errs []error
	for _, s := range strings.Split(c.NATSURL, ",") {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil || u.Host == "" || (u.Scheme != "nats" && u.Scheme != "tls" && u.Scheme != "ws" && u.Scheme != "wss") {
			errs = append(errs, errors.New("RELAY_NATS_URL must be nats://, tls://, ws:// or wss:// URLs with a host, separated by commas"))
			break
		}
	}
	for _, v := range []struct{ name, val string }{
		{"RELAY_NATS_STREAM", c.NATSStream}, {"RELAY_NATS_DEAD_LETTER_STREAM", c.NATSDeadLetterStream},
	} {
		if v.val == "" || strings.ContainsAny(v.val, " \t\r\n.*>/\\") {
			errs = append(errs, fmt.Errorf("%s %q is not a JetStream stream name (non-empty, no white space, '.', '*', '>', '/' or '\\\\')", v.name, v.val))
		}
	}
	if c.NATSStream == c.NATSDeadLetterStream {
		errs = append(errs, errors.New("RELAY_NATS_DEAD_LETTER_STREAM must differ from RELAY_NATS_STREAM"))
	}
	dl := c.NATSDeadLetterSubject
	for _, tok := range strings.Split(dl, ".") {
		if reason := subjectToken(tok); reason != "" {
			errs = append(errs, fmt.Errorf("RELAY_NATS_DEAD_LETTER_SUBJECT %q is not a NATS subject: %s", dl, reason))
			break
		}
	}
	if _, err := ParseRoutingKey(c.RoutingKey); err != nil {
		errs = append(errs, fmt.Errorf("RELAY_ROUTING_KEY: %w", err))
	} else if subjects, err := c.NATSStreamSubjects(); err != nil {
		errs = append(errs, err)
	} else {
		for _, s := range subjects {
			if s == dl || (strings.HasSuffix(s, ".>") && strings.HasPrefix(dl, strings.TrimSuffix(s, ">"))) {
				errs = append(errs, fmt.Errorf("RELAY_NATS_DEAD_LETTER_SUBJECT %q falls under the events stream's subjects %q "+
					"(from RELAY_ROUTING_KEY); choose a subject with another first token", dl, s))
			}
		}
	}
	if c.NATSDuplicateWindow <= 0 {
		errs = append(errs, fmt.Errorf("RELAY_NATS_DUPLICATE_WINDOW must be a positive duration, got %s", c.NATSDuplicateWindow))
	}
	return errs
}
