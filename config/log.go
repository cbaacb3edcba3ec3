package config

import (
	"fmt"
	"io"
	"os"

	"github.com/rs/zerolog"
)

// ParseLevel parses RELAY_LOG_LEVEL.
func ParseLevel(s string) (zerolog.Level, error) {
	switch s {
	case "trace", "debug", "info", "warn", "error":
		return zerolog.ParseLevel(s)
	}
	return zerolog.NoLevel, fmt.Errorf("RELAY_LOG_LEVEL %q is not one of trace, debug, info, warn, error", s)
}

// timeFormat has milliseconds: a reconnect or a drain takes less than a
// second, and its steps should not all look simultaneous.
const timeFormat = "2006-01-02T15:04:05.000Z07:00"

func init() { zerolog.TimeFieldFormat = timeFormat }

// Logger builds the process logger: JSON by default, console for people.
func (c *Config) Logger(w io.Writer) zerolog.Logger {
	if w == nil {
		w = os.Stderr
	}
	level, err := ParseLevel(c.LogLevel)
	if err != nil {
		level = zerolog.InfoLevel
	}
	if c.LogFormat == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: timeFormat}
	}
	return zerolog.New(w).Level(level).With().Timestamp().Logger()
}
